"""A stop signal with loader workers, as a preemption, a node drain or Ctrl-C sends it: the run checkpoints at its
agreed stop step and exits 128 + signal without a traceback (the loader workers do not die of the signal), and the
rerun resumes from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runner import barlow, tiny_spec, write_spec

from barlow import checkpoint
from barlow.data.shards import write_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_shards(demo_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    for split in ("train", "val"):  # small shards: every loader worker of both ranks reads several
        write_shards(str(demo_data / split), str(root / split), shard_size=16384, workers=1, progress=False)
    return root


def stopped_run(spec: Path, out: Path, stop) -> tuple[int, str]:
    """Start `barlow run pretrain` in a session of its own, call `stop(pid)` once its first metrics line is written;
    returns its exit code and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "barlow.cli", "run", "pretrain", str(spec)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be stopped"
    stop(proc.pid)
    _, stderr = proc.communicate(timeout=180)
    return proc.returncode, stderr


@pytest.mark.parametrize("data_format, signum, stop", [
    pytest.param("folder", signal.SIGTERM, lambda pid: os.kill(pid, signal.SIGTERM), id="folder-sigterm"),  # `kill PID`
    pytest.param("shards", signal.SIGTERM, lambda pid: os.kill(pid, signal.SIGTERM), id="shards-sigterm"),
    pytest.param("folder", signal.SIGINT, lambda pid: os.killpg(pid, signal.SIGINT), id="folder-ctrl-c"),  # the group
])
def test_a_stop_signal_with_loader_workers_checkpoints_then_resumes(demo_data, demo_shards, tmp_path, data_format,
                                                                    signum, stop):
    out = tmp_path / "run"
    spec = tiny_spec(demo_data, out, **{"data.workers": 2, "optim.epochs": 6, "output.checkpoint_every": 1000,
                                      "runtime.log_every": 10})
    if data_format == "shards":
        spec["data"].update(format="shards", train=str(demo_shards / "train" / "index.json"),
                            val=str(demo_shards / "val" / "index.json"), shuffle_buffer=200)
    path = write_spec(tmp_path, spec)

    code, stderr = stopped_run(path, out, stop)
    assert code == 128 + signum, stderr[-3000:]
    latest = checkpoint.latest(str(out))
    assert latest is not None, stderr[-3000:]
    saved = checkpoint.load(latest)["step"]
    assert 0 < saved < 1000  # written on the signal, not by the interval
    assert f"stopped by signal {signum} at step {saved}, after a checkpoint" in stderr
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-3000:]

    assert status(out) == ("stopped", int(signum), saved)  # not "running" with an ETA

    resumed = barlow("run", "pretrain", str(path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {saved}" in resumed.stdout
    assert status(out)[0] == "finished"


def status(out: Path) -> tuple[str, int | None, int | None]:
    """`barlow status OUTPUT -o json`: the state, the stop signal and the step."""
    shown = barlow("status", str(out), "-o", "json")
    assert shown.returncode == 0, shown.stderr
    p = json.loads(shown.stdout)["progress"]
    return p["state"], p["stopped_by_signal"], p["step"]
