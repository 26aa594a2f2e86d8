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
from runner import barlow, kill_after_first_checkpoint, kill_tree, tiny_spec, write_spec

from barlow import checkpoint, goodput

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
    rows = [r for r in rows if goodput.START_KEY not in r]  # the steps' lines, not the attempt's start line
    losses = [r["loss"] for r in rows if "loss" in r]
    half = len(losses) // 2
    assert half >= 8 and sum(losses[-half:]) < sum(losses[:half]), losses  # the loss falls: later half below earlier
    assert {"on_diag", "off_diag", "lr", "images_per_s", "probe_top1"} <= set(rows[0])  # the probe: on for labelled data
    knn = [r for r in rows if "knn_top1" in r][-1]  # after it, the final checkpoint's stall may have a line of its own
    assert set(knn) == {"step", "time", "epoch", "knn_top1"} and knn["knn_top1"] > 20.0
    assert knn["step"] == max(r["step"] for r in rows)  # the kNN at the last step
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
    step_at_kill = kill_after_first_checkpoint(spec_killed, killed)
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


def test_an_eval_spec_takes_the_checkpoints_model_and_a_mismatch_is_one_line(demo_data, tmp_path):
    """A `kind: eval` spec without model.* evaluates a narrow ResNet-18 checkpoint (the defaults are a ResNet-50); one
    whose model.* differs is refused in one line, not a size-mismatch traceback."""
    from barlow.model import BarlowTwins

    pretrain = tiny_spec(demo_data, tmp_path / "pretrain")
    m = pretrain["model"]
    net = BarlowTwins(m["arch"], m["projector"], m["small_images"], m["width"])
    checkpoint.save(str(tmp_path / "pretrain"), 4, {"model": net.state_dict(), "step": 4,
                                                    "run": {"model": {**m}, "batch_size": 128}}, keep=1)
    spec = {"kind": "eval", "name": "ev", "data": pretrain["data"], "runtime": {"nproc_per_node": 1, "device": "cpu"},
            "output": {"url": str(tmp_path / "eval")},
            "eval": {"epochs": 1, "batch_size": 64, "train_percent": 10, "checkpoint": str(tmp_path / "pretrain")}}
    result = barlow("run", "eval", str(write_spec(tmp_path, spec)))
    assert result.returncode == 0, result.stderr[-3000:]

    spec.update(model={"arch": "resnet18"}, output={"url": str(tmp_path / "eval-other")})
    result = barlow("run", "eval", str(write_spec(tmp_path, spec)))
    assert result.returncode == 1
    assert ("error (rank 0): eval: the spec's model.small_images False (the checkpoint's: True), model.width 64 (the "
            "checkpoint's: 8) does not match the pretraining's run record: leave model out of an eval spec to take the "
            "checkpoint's") in result.stderr.splitlines(), result.stderr
    assert "Traceback" not in result.stderr and "size mismatch" not in result.stderr


def test_rerunning_with_other_optim_epochs_names_the_new_schedule_or_refuses(demo_data, tmp_path):
    out = tmp_path / "run"
    spec = write_spec(tmp_path, tiny_spec(demo_data, out, **{"optim.epochs": 2, "runtime.nproc_per_node": 1,
                                                             "output.checkpoint_every": 100}))
    assert barlow("run", "pretrain", str(spec)).returncode == 0  # 11 steps an epoch: done at step 22
    longer = barlow("run", "pretrain", str(spec), "--set", "optim.epochs=3")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert ("resuming at step 22 (optim.epochs 2 -> 3: the warmup + cosine schedule now ends at step 33, not 22, so "
            "the lr at step 22 is 0.04294, not 0.0001)") in longer.stdout, longer.stdout
    assert checkpoint.load(checkpoint.latest(str(out)))["step"] == 33
    shorter = barlow("run", "pretrain", str(spec))
    assert shorter.returncode == 1
    assert (f"error (rank 0): output.url: {out} holds a run at step 33 (optim.epochs 3), past the end of optim.epochs 2 "
            "(22 steps): set optim.epochs 3 or more, or use a new output.url") in shorter.stderr.splitlines(), shorter.stderr


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(demo_data, tmp_path):
    out = tmp_path / "run"
    spec = write_spec(tmp_path, tiny_spec(demo_data, out, **{"optim.epochs": 2, "runtime.nproc_per_node": 1}))
    first = subprocess.Popen([sys.executable, "-m", "barlow.cli", "run", "pretrain", str(spec)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "lease.json").exists() and time.time() < deadline:
            time.sleep(0.1)
        second = barlow("run", "pretrain", str(spec))
        assert second.returncode == 1
        assert second.stderr.startswith(f"error: output.url: {out} is in use by another run (barlow run on "), second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and second.stdout == ""
        _, stderr = first.communicate(timeout=300)
    finally:
        kill_tree(first.pid)
    assert first.returncode == 0, stderr[-3000:]
    assert not (out / "lease.json").exists()  # released at the end: the next run may start
    again = barlow("run", "pretrain", str(spec))
    assert again.returncode == 0 and "resuming at step 22" in again.stdout, again.stderr[-2000:]
