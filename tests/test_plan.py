"""`barlow plan SPEC`: the numbers a run will have, before anything is submitted; estimates only from measured rows."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from barlow.cli import app
from barlow.launch import throughput
from barlow.launch.plan import make_plan
from barlow.spec import parse_spec

PAPER = {"kind": "pretrain", "name": "imagenet-r50",
         "data": {"train": "s3://d/train-index.json", "val": "s3://d/val-index.json", "format": "shards"},
         "optim": {"epochs": 300, "batch_size": 2048}, "output": {"url": "s3://runs/r50"},
         "runtime": {"nodes": 4, "nproc_per_node": 8, "device": "cuda"},
         "cluster": {"gpus_per_node": 8, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}}
CPU = {"kind": "pretrain", "name": "digits", "data": {"train": "d/train", "val": "d/val", "image_size": 32},
       "optim": {"epochs": 25, "batch_size": 128, "warmup_epochs": 2}, "output": {"url": "runs/d"},
       "runtime": {"nproc_per_node": 2, "device": "cpu"}}
EVAL = {"kind": "eval", "name": "lin", "data": {"train": "d/train", "val": "d/val"}, "output": {"url": "runs/e"},
        "eval": {"checkpoint": "runs/r50", "epochs": 100, "batch_size": 256, "train_percent": 10},
        "runtime": {"nproc_per_node": 1, "device": "cuda"}, "cluster": {"gpus_per_node": 1}}


@pytest.mark.parametrize("spec, images, want", [
    (PAPER, 1_281_167, dict(processes=32, gpus=32, global_batch=2048, steps_per_epoch=625, total_steps=187_500)),
    (CPU, 1000, dict(processes=2, gpus=0, global_batch=128, steps_per_epoch=7, total_steps=175)),
    (EVAL, 1_281_167, dict(processes=1, gpus=1, global_batch=256, steps_per_epoch=500, total_steps=50_000)),
    (CPU, None, dict(steps_per_epoch=None, total_steps=None, wall_hours=None)),
])
def test_plan_numbers(spec, images, want):
    plan = make_plan(parse_spec(spec), images)
    assert {k: getattr(plan, k) for k in want} == want


def test_no_estimate_without_a_measured_row(monkeypatch):
    monkeypatch.setattr(throughput, "MEASURED", [])
    plan = make_plan(parse_spec(PAPER), 1_281_167)
    assert plan.images_per_s_per_gpu is None and plan.wall_hours is None and plan.gpu_hours is None


def test_estimate_from_a_measured_row(monkeypatch):
    row = throughput.Measured("NVIDIA-H100-80GB-HBM3", "resnet50", 224, "bf16", 1000.0, "a row for this test")
    monkeypatch.setattr(throughput, "MEASURED", [row])
    plan = make_plan(parse_spec(PAPER), 1_281_167)
    assert plan.wall_hours == pytest.approx(187_500 * 2048 / (1000.0 * 32) / 3600)
    assert plan.gpu_hours == pytest.approx(plan.wall_hours * 32)
    assert make_plan(parse_spec(PAPER), 1_281_167, gpu="NVIDIA-A100-SXM4-80GB").wall_hours is None  # another GPU


def test_cli_plan_prints_not_measured(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(PAPER))
    result = CliRunner().invoke(app, ["plan", str(path), "--images", "1281167"])
    assert result.exit_code == 0, result.stderr
    rows = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert rows["global batch"].strip() == "2048 (64 per process)" and rows["total steps"].strip() == "187500 (300 epochs)"
    assert rows["wall time"].strip() == "not measured" and rows["GPU-hours"].strip() == "not measured"


def test_cli_plan_with_an_unreadable_shard_index_is_one_line(tmp_path):
    index = tmp_path / "missing-index.json"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**PAPER, "data": {**PAPER["data"], "train": str(index)}}))
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 1 and "data.train: cannot count the images in the shard index" in result.stderr
