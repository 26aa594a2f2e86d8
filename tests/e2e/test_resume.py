"""Resuming with real processes: pretraining on another world size, and a linear eval stopped by SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from runner import barlow, tiny_spec, write_spec

from barlow import checkpoint

pytestmark = pytest.mark.slow


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "barlow.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def stop_after_first_checkpoint(proc: subprocess.Popen, out) -> str:
    """SIGTERM a run once it has a complete checkpoint; returns its stderr (the run must exit 143)."""
    deadline = time.time() + 300
    while checkpoint.latest(str(out)) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 143, stderr[-3000:]
    return stderr


def lr_by_step(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows if "lr" in r}


def test_pretrain_checkpointed_by_two_processes_resumes_on_one(demo_data, tmp_path):
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    overrides = {"optim.epochs": 2, "output.checkpoint_every": 3}
    assert barlow("run", "pretrain", str(write_spec(tmp_path, tiny_spec(demo_data, straight, **overrides)))).returncode == 0
    spec = write_spec(tmp_path, tiny_spec(demo_data, moved, **overrides))

    stop_after_first_checkpoint(start("run", "pretrain", str(spec)), moved)
    saved = checkpoint.load(checkpoint.latest(str(moved)))
    assert saved["run"]["world_size"] == 2 and saved["run"]["batch_size"] == 128
    total = checkpoint.load(checkpoint.latest(str(straight)))["step"]
    assert 0 < saved["step"] < total

    resumed = barlow("run", "pretrain", str(spec), "--nproc", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {saved['step']} (world_size 2 -> 1" in resumed.stdout
    final = checkpoint.load(checkpoint.latest(str(moved)))
    assert final["step"] == total
    assert final["run"]["world_size"] == 1 and final["run"]["batch_size"] == 128
    # The same schedule continues: every step logged after the resume has the uninterrupted run's lr.
    expected, got = lr_by_step(straight), lr_by_step(moved)
    after = [s for s in got if s > saved["step"]]
    assert after and all(got[s] == pytest.approx(expected[s], rel=1e-9) for s in after), (got, expected)


def eval_spec(demo_data, tmp_path, out, backbone) -> dict:
    pretrain = tiny_spec(demo_data, tmp_path / "unused")
    spec = {k: pretrain[k] for k in ("data", "model", "runtime")}
    spec.update(kind="eval", name="ev", output={"url": str(out), "keep": 2},
                eval={"mode": "linear", "epochs": 6, "batch_size": 64, "backbone": str(backbone), "lr_head": 0.5})
    return spec


def test_linear_eval_stopped_by_sigterm_continues_where_it_stopped(demo_data, tmp_path):
    from barlow.model import build_backbone

    torch.manual_seed(0)
    backbone = tmp_path / "backbone.pt"
    torch.save(build_backbone("resnet18", small_images=True, width=8).state_dict(), backbone)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = barlow("run", "eval", str(write_spec(tmp_path, eval_spec(demo_data, tmp_path, straight, backbone))))
    assert done.returncode == 0, done.stderr[-3000:]

    spec = write_spec(tmp_path, eval_spec(demo_data, tmp_path, stopped, backbone))
    stderr = stop_after_first_checkpoint(start("run", "eval", str(spec)), stopped)
    assert "stopped by signal 15 at epoch" in stderr
    position = checkpoint.load(checkpoint.latest(str(stopped)))["data"]
    assert 1 <= position["epoch"] < 6
    assert not (stopped / "results.json").exists()

    resumed = barlow("run", "eval", str(spec))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at epoch {position['epoch']} step {position['in_epoch']}" in resumed.stdout
    epochs_logged = [json.loads(line)["epoch"] for line in (stopped / "metrics.jsonl").read_text().splitlines()
                     if "loss" in line]
    assert epochs_logged == list(range(1, 7))  # each epoch trained once: the rerun did not start over
    steps_logged = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()
                    if "loss" in line]
    assert steps_logged[-1] == checkpoint.step_of(checkpoint.latest(str(stopped)))  # logs and checkpoints count alike
    a, b = (checkpoint.load(checkpoint.latest(str(o)))["trained"] for o in (straight, stopped))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"head {k} differs after resume")
    ra, rb = (json.loads((o / "results.json").read_text()) for o in (straight, stopped))
    assert abs(ra["top1"] - rb["top1"]) <= 100 / ra["val_images"] + 1e-9  # at most one image flips
