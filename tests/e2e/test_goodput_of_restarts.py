"""Goodput of a run SIGKILLed twice, from its own files: `barlow status` accounts for every second of its wall time."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from runner import barlow, kill_tree, tiny_spec, write_spec

from barlow import checkpoint

pytestmark = pytest.mark.slow


def last_logged(out) -> int:
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    steps = [json.loads(line)["step"] for line in lines if '"loss"' in line and line.endswith("}")]
    return steps[-1] if steps else 0


def kill_after_checkpoint(spec_path, out, newer_than: str | None) -> str:
    """Start the run, SIGKILL it (and its workers) once a checkpoint newer than `newer_than` is complete."""
    proc = subprocess.Popen([sys.executable, "-m", "barlow.cli", "run", "pretrain", str(spec_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        latest = checkpoint.latest(str(out))
        if latest is not None and latest != newer_than:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    saved = checkpoint.step_of(checkpoint.latest(str(out)))
    while time.time() < deadline and proc.poll() is None and last_logged(out) <= saved:
        time.sleep(0.1)  # a logged step after the checkpoint: work the next attempt does again
    kill_tree(proc.pid)
    proc.wait(timeout=60)
    return checkpoint.latest(str(out))


def test_status_accounts_for_a_run_killed_twice(demo_data, tmp_path):
    out = tmp_path / "run"
    spec = write_spec(tmp_path, tiny_spec(demo_data, out, **{"optim.epochs": 3, "output.checkpoint_every": 3,
                                                              "runtime.nproc_per_node": 1}))
    first = kill_after_checkpoint(spec, out, None)
    time.sleep(2.0)  # the restart's gap
    kill_after_checkpoint(spec, out, first)
    time.sleep(2.0)
    assert barlow("run", "pretrain", str(spec)).returncode == 0
    result = barlow("status", str(out), "-o", "json")
    assert result.returncode == 0, result.stderr
    g = json.loads(result.stdout)["progress"]["goodput"]
    assert g["attempts"] == 3
    assert g["restarts_s"] >= 4.0  # the two gaps of 2 s at least, and the start-ups of the attempts after them
    assert g["redone_s"] > 0 and g["startup_s"] > 0 and g["productive_s"] > 0
    parts = sum(g[k] for k in ("productive_s", "startup_s", "restarts_s", "redone_s", "checkpoint_stall_s", "data_wait_s"))
    assert parts == pytest.approx(g["wall_s"], rel=1e-6)
    assert 0 < g["percent"] < 100
    text = barlow("status", str(out)).stdout
    assert "goodput:" in text and "3 attempt(s)" in text, text


def test_checkpoint_every_auto_takes_the_young_daly_interval(demo_data, tmp_path):
    import os
    import re

    from barlow.goodput import interval_steps

    out = tmp_path / "auto"
    spec = write_spec(tmp_path, tiny_spec(demo_data, out, **{
        "optim.epochs": 2, "runtime.nproc_per_node": 1, "output.checkpoint_every": "auto", "output.keep": 100,
        "cluster.node_mtbf_hours": 0.5}))  # a failure every 30 minutes: for this tiny state, a checkpoint every few steps
    result = barlow("run", "pretrain", str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"output\.checkpoint_every auto: every (\d+) steps \(([\d.e-]+) s a step, a state of (\d+) MB",
                      result.stdout + result.stderr)
    assert found, result.stdout[-3000:]
    every, step_s, mb = int(found[1]), float(found[2]), int(found[3])
    want = interval_steps(mb * 1_000_000, step_s, 0.5, 1)  # from the printed (rounded) numbers
    assert abs(every - want) <= max(1, want // 10)
    steps = sorted(int(n.split("-")[1]) for n in os.listdir(out / "checkpoints"))
    first_log = 2  # runtime.log_every: the interval is known from there on
    assert steps == sorted({s for s in range(every, steps[-1], every) if s > first_log} | {steps[-1]})
