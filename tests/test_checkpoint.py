"""Checkpoints: visible only when complete, newest complete one wins, keep-last-K, safe loading."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from barlow import checkpoint, storage


def state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((3, 3), float(step))}, "rng_cpu": torch.get_rng_state()}


def test_round_trip_and_latest(tmp_path):
    out = str(tmp_path / "run")
    assert checkpoint.latest(out) is None
    for step in (10, 20, 30):
        checkpoint.save(out, step, state(step), keep=5)
    url = checkpoint.latest(out)
    assert url.endswith("step-00000030")
    loaded = checkpoint.load(url)
    assert loaded["step"] == 30 and torch.equal(loaded["model"]["w"], torch.full((3, 3), 30.0))


def test_keep_last_k(tmp_path):
    out = str(tmp_path / "run")
    for step in range(1, 7):
        checkpoint.save(out, step, state(step), keep=2)
    assert storage.list_names(checkpoint.folder(out)) == ["step-00000005", "step-00000006"]


@pytest.mark.parametrize("partial", ["no-marker", "truncated-no-marker", "empty-folder"])
def test_partial_write_is_never_latest(tmp_path, partial):
    out = str(tmp_path / "run")
    checkpoint.save(out, 10, state(10), keep=3)
    newer = storage.join(checkpoint.folder(out), "step-00000020")
    if partial == "no-marker":
        checkpoint.save(out, 20, state(20), keep=3)
        os.remove(os.path.join(newer, storage.COMMIT_MARKER))
    elif partial == "truncated-no-marker":
        checkpoint.save(out, 20, state(20), keep=3)
        os.remove(os.path.join(newer, storage.COMMIT_MARKER))
        path = os.path.join(newer, "state.pt")
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        os.makedirs(newer)
    assert checkpoint.latest(out).endswith("step-00000010")
    assert checkpoint.remove_incomplete(out) == [newer]
    assert storage.list_names(checkpoint.folder(out)) == ["step-00000010"]


def test_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    out = str(tmp_path / "run")
    checkpoint.save(out, 1, {"step": 1, "payload": Evil()}, keep=1)
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoint.load(checkpoint.latest(out))


WRITER = textwrap.dedent("""
    import sys, torch
    from barlow import checkpoint
    out = sys.argv[1]
    big = torch.randn(4_000_000)  # 16 MB: a write takes long enough to be cut in the middle
    step = 0
    while True:
        step += 1
        checkpoint.save(out, step, {"step": step, "w": big + step}, keep=1000)
        print(step, flush=True)
""")


def test_sigkill_mid_write_leaves_a_loadable_latest(tmp_path):
    out = str(tmp_path / "run")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    cut_midway = False
    for attempt in range(8):  # kill at different moments until one lands inside a write
        proc = subprocess.Popen([sys.executable, str(script), out], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip()  # at least one checkpoint is complete
        time.sleep(0.05 + 0.037 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        names = storage.list_names(checkpoint.folder(out))
        newest = storage.join(checkpoint.folder(out), names[-1])
        cut_midway |= not storage.is_complete(newest)
        latest = checkpoint.latest(out)
        loaded = checkpoint.load(latest)
        assert loaded["step"] == int(latest.rsplit("-", 1)[1])
        assert loaded["w"].shape == (4_000_000,)
        if cut_midway:
            break
    assert cut_midway, "no kill landed inside a write; the test did not exercise a partial checkpoint"
