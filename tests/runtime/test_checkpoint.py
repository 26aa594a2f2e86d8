"""Checkpoints: visible only when complete, newest complete one wins, keep-last-K, safe loading."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc

import pytest
import torch

from barlow import checkpoint, storage
from barlow.errors import OutputHoldsAnotherRun


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
    out, background = sys.argv[1], sys.argv[2] == "background"

    class Weights:
        w = torch.randn(4_000_000)  # 16 MB: a write takes long enough to be cut in the middle
        def state_dict(self):
            return {"w": self.w}

    weights = Weights()
    writer = checkpoint.Checkpointer(out, every=1, keep=1000, is_main=True, parts={"weights": weights}, run={})
    step = 0
    while True:
        step += 1
        if background:  # the Checkpointer's upload thread writes while this one goes on changing the weights
            writer.save(step)
            weights.w.add_(1.0)
        else:
            checkpoint.save(out, step, {"step": step, "weights": {"w": weights.w}}, keep=1000)
        print(step, flush=True)
""")


@pytest.mark.parametrize("mode", ["inline", "background"])
def test_sigkill_mid_write_leaves_a_loadable_latest(tmp_path, mode):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    cut_midway = False
    for attempt in range(16):  # kill at different moments until one lands inside a write
        out = str(tmp_path / f"run-{attempt}")  # its own folder: a writer starts again at step 1
        proc = subprocess.Popen([sys.executable, str(script), out, mode], stdout=subprocess.PIPE, text=True)
        while not checkpoint.latest(out):  # at least one checkpoint is complete
            assert proc.stdout.readline().strip()
        time.sleep(0.05 + 0.037 * (attempt % 8))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        names = storage.list_names(checkpoint.folder(out))
        newest = storage.join(checkpoint.folder(out), names[-1])
        cut_midway |= not storage.is_complete(newest)
        latest = checkpoint.latest(out)
        loaded = checkpoint.load(latest)
        assert loaded["step"] == int(latest.rsplit("-", 1)[1])
        assert loaded["weights"]["w"].shape == (4_000_000,)
        if cut_midway:
            break
    assert cut_midway, "no kill landed inside a write; the test did not exercise a partial checkpoint"


class Counter:
    """A stateful part that is not a module: what the data position looks like to the Checkpointer."""

    def __init__(self, n: int = 0):
        self.n = n

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def parts(seed: int) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # a momentum buffer to carry over
    return {"model": model, "optimizer": optimizer, "data": Counter(seed)}


@pytest.mark.parametrize("every, last, due_at", [
    (4, 10, [4, 8, 10]),
    (1, 3, [1, 2, 3]),
    (100, 7, [7]),
])
def test_checkpointer_cadence(tmp_path, every, last, due_at):
    c = checkpoint.Checkpointer(str(tmp_path), every=every, keep=2, is_main=True, parts={}, run={})
    assert [s for s in range(1, last + 1) if c.due(s, last)] == due_at


def test_checkpointer_hands_each_part_its_state_and_keeps_the_run_record(tmp_path):
    out = str(tmp_path / "run")
    saved = parts(seed=1)
    writer = checkpoint.Checkpointer(out, every=1, keep=2, is_main=True, parts=saved, run={"world_size": 2, "seed": 7})
    for step in (1, 2, 3):
        saved["data"].n = step * 10
        writer.save(step)
    writer.wait()
    assert storage.list_names(checkpoint.folder(out)) == ["step-00000002", "step-00000003"]

    fresh = parts(seed=2)
    reader = checkpoint.Checkpointer(out, every=1, keep=2, is_main=True, parts=fresh, run={"world_size": 1, "seed": 7})
    seen = []
    assert reader.resume(lambda run, url: seen.append((run, url))) == 3
    assert seen == [({"world_size": 2, "seed": 7}, checkpoint.latest(out))] and reader.resumed_run["world_size"] == 2
    assert fresh["data"].n == 30
    for a, b in zip(saved["model"].parameters(), fresh["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    momentum = [s["momentum_buffer"] for s in fresh["optimizer"].state.values()]
    assert momentum and all(torch.equal(m, s["momentum_buffer"]) for m, s in
                            zip(momentum, saved["optimizer"].state.values(), strict=True))


def test_checkpointer_without_a_checkpoint_starts_at_zero_and_refusal_loads_nothing(tmp_path):
    out = str(tmp_path / "run")
    fresh = parts(seed=2)
    assert checkpoint.Checkpointer(out, every=1, keep=1, is_main=True, parts=fresh, run={}).resume() == 0
    checkpoint.Checkpointer(out, every=1, keep=1, is_main=True, parts=parts(seed=1), run={}).save(5, wait=True)

    def refuse(run, url):
        raise ValueError(f"{url}: another run")

    before = fresh["model"].weight.clone()
    with pytest.raises(ValueError, match="step-00000005: another run"):
        checkpoint.Checkpointer(out, every=1, keep=1, is_main=True, parts=fresh, run={}).resume(refuse)
    assert torch.equal(fresh["model"].weight, before) and fresh["data"].n == 2


def test_checkpointer_on_s3_uses_the_settings_it_is_given(s3):
    # The process default points at a closed port: a call that does not pass the run's settings fails.
    storage.configure_s3(storage.S3Settings(endpoint_url="http://127.0.0.1:9", retries=1))
    out = f"{s3.url}/run"
    saved = parts(seed=1)
    writer = checkpoint.Checkpointer(out, every=1, keep=1, is_main=True, parts=saved, run={"seed": 7}, s3=s3.settings)
    for step in (1, 2):
        writer.save(step)
    writer.wait()
    assert storage.list_names(checkpoint.folder(out), s3.settings) == ["step-00000002"]
    fresh = parts(seed=2)
    assert checkpoint.Checkpointer(out, every=1, keep=1, is_main=True, parts=fresh, run={}, s3=s3.settings).resume() == 2
    assert torch.equal(fresh["model"].weight, saved["model"].weight) and fresh["data"].n == 1


def test_a_checkpoint_streams_to_storage_without_a_copy_in_memory(tmp_path):
    big = torch.randn(8_000_000)  # 32 MB
    tracemalloc.start()
    try:
        checkpoint.save(str(tmp_path / "run"), 1, {"step": 1, "w": big}, keep=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, f"saving held {peak / 1e6:.0f} MB of Python memory (a serialised copy of the state)"
    assert torch.equal(checkpoint.load(checkpoint.latest(str(tmp_path / "run")))["w"], big)


def test_a_checkpoint_from_before_a_part_existed_resumes_with_it_fresh(tmp_path):
    out = str(tmp_path)
    # the previous layout: the current parts minus the probe (written before the online probe existed)
    checkpoint.Checkpointer(out, every=1, keep=1, is_main=True, parts={"model": Counter(5)}, run={}).save(3, wait=True)
    model, probe = Counter(), Counter(-1)
    reader = checkpoint.Checkpointer(out, every=1, keep=1, is_main=True, parts={"model": model, "probe": probe}, run={},
                                     optional=("probe",))
    assert reader.resume() == 3
    assert (model.n, probe.n, reader.fresh_parts) == (5, -1, ["probe"])
    strict = checkpoint.Checkpointer(out, every=1, keep=1, is_main=True, parts={"model": Counter(), "other": Counter()},
                                     run={})
    with pytest.raises(OutputHoldsAnotherRun, match="holds no other state"):
        strict.resume()  # only a part declared optional may be missing


# ---- saving in the background ---------------------------------------------------------------------------------

class Weights:
    """A part whose tensor the test changes in place after a save, as the optimizer step after a checkpoint does."""

    def __init__(self, n: int):
        self.w = torch.arange(n, dtype=torch.float32)

    def state_dict(self) -> dict:
        return {"w": self.w}

    def load_state_dict(self, state: dict) -> None:
        self.w = state["w"]


def test_a_save_holds_the_state_of_its_step_while_training_changes_it(tmp_path):
    out = str(tmp_path / "run")
    weights = Weights(1000)
    writer = checkpoint.Checkpointer(out, every=1, keep=3, is_main=True, parts={"weights": weights}, run={})
    for step in (1, 2, 3):
        writer.save(step)
        weights.w.add_(1.0)  # the next step changes the live tensor while the upload may still read
    writer.wait()
    for step in (1, 2, 3):
        saved = checkpoint.load(storage.join(checkpoint.folder(out), f"step-{step:08d}"))
        assert torch.equal(saved["weights"]["w"], torch.arange(1000, dtype=torch.float32) + (step - 1))
    assert writer.take_stall() > 0 and writer.take_stall() == 0  # the stall is handed out once


@pytest.fixture
def slow_s3(s3):
    """The test's S3 prefix behind a loopback link of 2 MB/s: an 8 MB checkpoint takes about 4 s to upload."""
    from s3server import SlowDownProxy

    with SlowDownProxy(int(s3.server.endpoint_url.rsplit(":", 1)[1]), bytes_per_s=2e6) as proxy:
        yield s3, storage.S3Settings(endpoint_url=proxy.url, retries=3), proxy


def test_the_upload_runs_behind_training_and_one_at_a_time(slow_s3):
    s3, settings, proxy = slow_s3
    out = f"{s3.url}/run"
    writer = checkpoint.Checkpointer(out, every=1, keep=2, is_main=True, parts={"weights": Weights(2_000_000)},
                                     run={}, s3=settings)
    writer.save(1)
    # the snapshot is taken and save returned: the 8 MB are still on their way (about 4 s at 2 MB/s)
    assert checkpoint.latest(out, s3.settings) is None
    writer.save(2)  # waits for the upload of step 1 before it snapshots step 2
    assert checkpoint.latest(out, s3.settings).endswith("step-00000001")
    writer.wait()
    assert checkpoint.latest(out, s3.settings).endswith("step-00000002")
    assert proxy.received > 2 * 8_000_000


def test_a_failed_upload_fails_the_run_retryably_at_the_next_save(tmp_path):
    from barlow.errors import CheckpointUploadFailed, is_retryable

    # nothing listens on port 9 of loopback: every attempt of the upload fails
    writer = checkpoint.Checkpointer("s3://bucket/run", every=1, keep=1, is_main=True, parts={"weights": Weights(10)},
                                     run={}, s3=storage.S3Settings(endpoint_url="http://127.0.0.1:9", retries=1))
    writer.save(1)
    with pytest.raises(CheckpointUploadFailed, match=r"checkpoint upload to s3://bucket/run/checkpoints failed") as e:
        writer.save(2)
    assert is_retryable(e.value.exit_code)
    writer.wait()  # raised once: save(2) stopped before its snapshot, so nothing is in flight
