"""The restart budget's counting (barlow.restarts), in process; tests/e2e/test_restart_budget.py runs it for real."""

from __future__ import annotations

import json

import pytest

from barlow import restarts, storage
from barlow.spec import parse_spec

SPEC = {"kind": "pretrain", "name": "r", "data": {"train": "d/train", "val": "d/val"},
        "optim": {"epochs": 2, "warmup_epochs": 1, "batch_size": 64}}


def _spec(out, max_restarts: int):
    return parse_spec({**SPEC, "output": {"url": str(out)}, "cluster": {"max_restarts": max_restarts}})


def _checkpoint(out, step: int) -> None:
    url = storage.join(str(out), "checkpoints", f"step-{step:08d}")
    storage.write_bytes(storage.join(url, "state.pt"), b"x")
    storage.commit(url)


# Each attempt: (the code it ends with, or None when it dies without recording its end; a checkpoint step it writes
# first, or None); expected: the exit code of each attempt (None: it died), with max_restarts 2.
CASES = [
    ("three-retryable-no-progress", [(144, None), (143, None), (144, None)], [144, 143, 1]),
    ("progress-resets-the-streak", [(144, None), (143, 1), (144, None), (144, 2), (143, None), (144, None)],
     [144, 143, 144, 144, 143, 1]),  # attempt 4 wrote a checkpoint, then 4, 5, 6 failed with none between them
    ("a-hard-death-counts", [(144, None), (None, None), (144, None)], [144, None, 1]),
    ("permanent-and-success-are-not-counted", [(144, None), (1, None), (144, None), (0, None), (144, None)],
     [144, 1, 144, 0, 144]),
    ("spent-at-start-after-a-lost-permanent-exit", [(144, None), (144, None), (None, None), (143, None)], [144, 144, None, 1]),
]


@pytest.mark.parametrize("attempts, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_budget_counts_retryable_failures_since_the_last_checkpoint(tmp_path, monkeypatch, attempts, expected):
    monkeypatch.setenv("PET_NNODES", "1")
    monkeypatch.setenv("RANK", "0")
    spec, said, got = _spec(tmp_path / "out", 2), [], []
    for code, step in attempts:
        if code is None:  # killed hard: started, never ended
            budget = restarts.Budget.open(spec)
            budget.at_start()
            if step:
                _checkpoint(tmp_path / "out", step)
            got.append(None)
            continue

        def run(code=code, step=step):
            if step:
                _checkpoint(tmp_path / "out", step)
            return code
        got.append(restarts.bounded(spec, run, said.append))
    assert got == expected
    assert len(said) == expected.count(1) - sum(1 for c, _ in attempts if c == 1)
    assert all("restart budget spent" in s and "\n" not in s for s in said)


def test_outside_a_pod_the_budget_does_not_apply(tmp_path, monkeypatch):
    monkeypatch.delenv("PET_NNODES", raising=False)
    spec = _spec(tmp_path / "out", 0)
    assert [restarts.bounded(spec, lambda: 143, print) for _ in range(3)] == [143, 143, 143]
    assert not (tmp_path / "out" / "attempts").exists()


def test_only_rank_0_keeps_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("PET_NNODES", "1")
    monkeypatch.setenv("RANK", "3")
    assert restarts.bounded(_spec(tmp_path / "out", 0), lambda: 144, print) == 144
    assert not (tmp_path / "out" / "attempts").exists()


def test_records_are_small_json_objects(tmp_path, monkeypatch):
    monkeypatch.setenv("PET_NNODES", "1")
    monkeypatch.setenv("RANK", "0")
    restarts.bounded(_spec(tmp_path / "out", 1), lambda: 143, print)
    (path,) = (tmp_path / "out" / "attempts").iterdir()
    record = json.loads(path.read_text())
    assert path.name == "attempt-000001.json" and record["code"] == 143 and record["exit"] == 143
    assert set(record) == {"attempt", "host", "started", "ended", "checkpoint", "code", "exit"}
