"""The local runtime end to end: real torchrun processes on the CPU, real JPEGs, real checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision
from runner import barlow, kill_tree, tiny_spec, write_spec

from barlow import checkpoint

pytestmark = pytest.mark.slow


def final_weights(out) -> dict[str, torch.Tensor]:
    return checkpoint.load(checkpoint.latest(str(out)))["model"]


def test_pipeline_on_demo_data(demo_data, tmp_path):
    out = tmp_path / "run"
    # 6 epochs: in 3 the tiny model's loss moves less than its step-to-step noise (about +-5 around 120)
    spec = write_spec(tmp_path, tiny_spec(demo_data, out, **{"optim.epochs": 6}))
    result = barlow("run", "pipeline", str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "top-1" in result.stdout

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    half = len(losses) // 2
    assert half >= 8 and sum(losses[-half:]) < sum(losses[:half]), losses  # the loss falls: later half below earlier
    assert {"on_diag", "off_diag", "lr", "images_per_s", "probe_top1"} <= set(rows[0])  # the probe: on for labelled data
    assert set(rows[-1]) == {"step", "time", "epoch", "knn_top1"} and rows[-1]["knn_top1"] > 20.0  # the kNN at the last step
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "cross_correlation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The export is a plain torchvision ResNet state_dict: only the classifier is missing.
    backbone = torch.load(out / "backbone.pt", weights_only=True)
    assert not any(k.startswith("fc.") for k in backbone)
    model = torchvision.models.resnet18()
    model.conv1 = torch.nn.Conv2d(3, 8, 3, 1, 1, bias=False)  # the small-image stem at width 8
    shaped = {k: v for k, v in backbone.items() if model.state_dict()[k].shape == v.shape}
    assert len(shaped) > 0.1 * len(backbone)

    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["top1"] > 40.0, results  # 10 classes: chance is 10 %
    assert results["knn_top1"] > 40.0, results
    assert results["checkpoint"] == str(out)


def test_default_width_export_loads_into_torchvision(tmp_path):
    from barlow.model import build_backbone

    state = build_backbone("resnet50").state_dict()
    missing, unexpected = torchvision.models.resnet50().load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


def test_sigkill_and_restart_matches_uninterrupted_run(demo_data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    spec_straight = write_spec(tmp_path, tiny_spec(demo_data, straight))
    spec_killed = write_spec(tmp_path, tiny_spec(demo_data, killed))
    assert barlow("run", "pretrain", str(spec_straight)).returncode == 0

    # Start the second run, SIGKILL every process of it once it has checkpointed, then rerun.
    proc = subprocess.Popen([sys.executable, "-m", "barlow.cli", "run", "pretrain", str(spec_killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while checkpoint.latest(str(killed)) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    kill_tree(proc.pid, signal.SIGKILL)
    proc.wait()
    step_at_kill = checkpoint.load(checkpoint.latest(str(killed)))["step"]
    total = checkpoint.load(checkpoint.latest(str(straight)))["step"]
    assert 0 < step_at_kill < total

    resumed = barlow("run", "pretrain", str(spec_killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {step_at_kill}" in resumed.stdout
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs after resume")


def test_sigterm_checkpoints_then_exits_retryable(demo_data, tmp_path):
    out = tmp_path / "run"
    spec = write_spec(tmp_path, tiny_spec(demo_data, out, **{"optim.epochs": 20, "output.checkpoint_every": 1000}))
    proc = subprocess.Popen([sys.executable, "-m", "barlow.cli", "run", "pretrain", str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)  # `kill PID` on barlow: passed to torchrun, which passes it to the workers
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    saved = checkpoint.load(checkpoint.latest(str(out)))["step"]
    assert 0 < saved < 1000  # written on the signal, not by the interval
    assert "stopped by signal 15" in stderr


def test_bad_spec_runs_nothing(tmp_path):
    out = tmp_path / "never"
    spec = write_spec(tmp_path, tiny_spec(tmp_path, out, **{"optim.batch_size": 127}))
    result = barlow("run", "pretrain", str(spec))
    assert result.returncode == 2
    assert "optim.batch_size: must be divisible by 2" in result.stderr
    assert not out.exists()


def test_missing_data_folder_is_one_line_error(tmp_path):
    spec = write_spec(tmp_path, tiny_spec(tmp_path / "nowhere", tmp_path / "out", **{"runtime.nproc_per_node": 1}))
    result = barlow("run", "pretrain", str(spec))
    assert result.returncode == 1
    assert "nowhere/train: no such image folder" in result.stderr
    assert "failed (exitcode: 1)" not in result.stderr  # the one error line says it all: no torchrun block after it
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        line for line in result.stderr.splitlines() if line.startswith("error")], result.stderr


@pytest.mark.parametrize("mode, percent", [("finetune", 10), ("linear", 1)])
def test_eval_of_an_exported_backbone(demo_data, tmp_path, mode, percent):
    from barlow.model import build_backbone

    torch.save(build_backbone("resnet18", small_images=True, width=8).state_dict(), tmp_path / "backbone.pt")
    pretrain = tiny_spec(demo_data, tmp_path / "unused")
    spec = {k: pretrain[k] for k in ("data", "model", "runtime")}
    spec.update(kind="eval", name="ev", output={"url": str(tmp_path / "eval")},
                eval={"mode": mode, "train_percent": percent, "epochs": 2, "batch_size": 8 if percent == 1 else 64,
                      "backbone": str(tmp_path / "backbone.pt"), "lr_backbone": 0.01 if mode == "finetune" else 0.0})
    result = barlow("run", "eval", str(write_spec(tmp_path, spec)))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["mode"] == mode and results["train_percent"] == percent and results["val_images"] == 364
    assert 0 <= results["top1"] <= results["top5"] <= 100
