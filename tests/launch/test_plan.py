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


def sections(stdout: str) -> dict[str, dict[str, str]]:
    """`barlow plan`'s output: stage title -> {label: value}."""
    out: dict[str, dict[str, str]] = {}
    for line in stdout.splitlines():
        if not line.startswith("  "):
            title = line.rstrip(":")
            out[title] = {}
        else:
            label, value = line.strip().split(":", 1)
            out[title][label] = value.strip()
    return out


def plan_cli(tmp_path, spec: dict, *args: str) -> tuple[int, dict[str, dict[str, str]], str]:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["plan", str(path), *args])
    return result.exit_code, sections(result.stdout), result.stderr


def test_cli_plan_prints_not_measured(tmp_path):
    code, out, err = plan_cli(tmp_path, PAPER, "--images", "1281167")
    assert code == 0, err
    rows = out["pretrain"]
    assert rows["global batch"] == "2048 (64 per process)" and rows["total steps"] == "187500 (300 epochs)"
    assert rows["wall time"] == "not measured" and rows["GPU-hours"] == "not measured"


def test_cli_plan_prints_wall_time_and_gpu_hours_from_a_measured_row(tmp_path, monkeypatch):
    row = throughput.Measured("NVIDIA-H100-80GB-HBM3", "resnet50", 224, "bf16", 1000.0, "a row for this test")
    monkeypatch.setattr(throughput, "MEASURED", [row])
    code, out, err = plan_cli(tmp_path, PAPER, "--images", "1281167")
    assert code == 0, err
    hours = 187_500 * 2048 / (1000.0 * 32) / 3600  # total steps x global batch / (images/s per GPU x GPUs)
    rows = out["pretrain"]
    assert rows["throughput"] == "1000 images/s per GPU (a row for this test)"
    assert rows["wall time"] == f"{hours:.1f} h" and rows["GPU-hours"] == f"{hours * 32:.0f}"
    assert rows["wall time"] != "not measured"


@pytest.mark.parametrize("overrides, processes, gpus", [
    ({}, "1 node(s) × 8 = 8", "8 × NVIDIA-H100-80GB-HBM3"),  # one node by default
    ({"cluster": {"gpus_per_node": 1}}, "1 node(s) × 1 = 1", "1 × NVIDIA-H100-80GB-HBM3"),
    ({"runtime": {"nodes": 2}}, "2 node(s) × 8 = 16", "16 × NVIDIA-H100-80GB-HBM3"),
])
def test_cli_plan_shows_the_pipelines_eval_stage(tmp_path, overrides, processes, gpus):
    code, out, err = plan_cli(tmp_path, {**PAPER, "eval": {"train_percent": 10, **overrides}}, "--images", "1281167")
    assert code == 0, err
    assert list(out) == ["pretrain", "eval (the pipeline's, after pretrain: imagenet-r50-eval)"]
    ev = out["eval (the pipeline's, after pretrain: imagenet-r50-eval)"]
    assert (ev["processes"], ev["GPUs"]) == (processes, gpus)
    assert ev["images"] == "128116 (10 % of the labelled images)" and ev["total steps"] == f"{128116 // 256 * 100} (100 epochs)"
    assert out["pretrain"]["processes"] == "4 node(s) × 8 = 32"


def test_cli_plan_says_why_the_pipelines_eval_cannot_run(tmp_path):
    code, out, err = plan_cli(tmp_path, {**PAPER, "data": {**PAPER["data"], "val": None}}, "--images", "1281167")
    assert code == 0, err
    assert out["pretrain"]["total steps"] == "187500 (300 epochs)"
    assert "eval (the pipeline's): cannot run: data.val: an eval needs validation images" in out


def test_cli_plan_with_an_unreadable_shard_index_still_answers(tmp_path):
    index = tmp_path / "missing-index.json"
    code, out, err = plan_cli(tmp_path, {**PAPER, "data": {**PAPER["data"], "train": str(index)}})
    assert code == 0, err
    images = out["pretrain"]["images"]
    assert images.startswith(f"unknown (cannot read the shard index (FileNotFoundError: {index}: no shard index there")
    assert images.endswith("pass --images N)")
    assert out["pretrain"]["global batch"] == "2048 (64 per process)" and out["pretrain"]["total steps"] == "unknown"


@pytest.fixture
def s3_index(s3, tmp_path):
    """A real shard index (12 images) on the test S3 server; the endpoint as a spec's data.s3 names it."""
    from imagesets import write_tagged_folder

    from barlow.data.shards import write_shards

    write_tagged_folder(tmp_path / "images", 12, classes=3)
    summary = write_shards(str(tmp_path / "images"), f"{s3.url}/shards", shard_size=10240, workers=1, progress=False)
    return summary["index"], {"endpoint_url": s3.server.endpoint_url}


def test_cli_plan_counts_a_shard_index_on_s3(tmp_path, s3_index):
    index, s3 = s3_index
    code, out, err = plan_cli(tmp_path, {**PAPER, "data": {**PAPER["data"], "train": index, "s3": s3}})
    assert code == 0, err
    assert out["pretrain"]["images"] == "12"


def test_cli_plan_without_s3_credentials_prints_everything_else(tmp_path, s3_index, monkeypatch):
    import s3fs

    index, s3 = s3_index
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata look-up on a laptop or CI
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would still hold the credentials
    try:
        code, out, err = plan_cli(tmp_path, {**PAPER, "data": {**PAPER["data"], "train": index, "s3": s3}})
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # nor may the credential-less client serve later tests
    assert code == 0, err
    for stage in out.values():
        assert stage["images"] == f"unknown (no credentials for {index})"
        assert stage["global batch"] and stage["processes"] and stage["GPUs"]
    assert len(out) == 2  # the eval stage too


@pytest.mark.parametrize("layout, want", [("flat", "64 images, unlabelled (flat folder)"),
                                          ("dated", "64 images, unlabelled (nested folders)")])
def test_cli_plan_counts_an_image_folder_and_says_what_it_is(tmp_path, layout, want):
    from imagesets import write_tagged_folder, write_unlabelled_folder

    write_unlabelled_folder(tmp_path / "photos", 64, layout)
    write_tagged_folder(tmp_path / "labelled", 40)
    spec = {**CPU, "data": {**CPU["data"], "train": str(tmp_path / "photos")},
            "eval": {"data": {"train": str(tmp_path / "labelled"), "val": str(tmp_path / "labelled")}}}
    code, out, err = plan_cli(tmp_path, spec)
    assert code == 0, err
    assert out["pretrain"]["data"] == want and out["pretrain"]["images"] == "64"
    assert out["pretrain"]["steps/epoch"] == "0"
    ev = next(v for k, v in out.items() if k.startswith("eval"))
    assert ev["data"] == "40 images, 4 classes (class folders)" and ev["images"] == "40"  # the eval's own data
# -- how often to checkpoint (Young/Daly) -----------------------------------------------------------------------------


def test_the_checkpoint_size_estimate_matches_a_real_checkpoint(tmp_path):
    import os

    import torch

    from barlow import checkpoint
    from barlow.launch.plan import state_bytes
    from barlow.model import BarlowTwins
    from barlow.optim import LARS, param_groups
    from barlow.train import backbone_of

    spec = parse_spec({**CPU, "model": {"arch": "resnet18", "width": 32, "projector": "1024-1024-1024"}})
    m = spec.model
    model = BarlowTwins(m.arch, m.projector, m.small_images, m.width)
    optimizer = LARS(param_groups(model, 0.2, 0.0048), lr=0.1, momentum=0.9)
    z1, z2 = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    (z1 - z2).pow(2).sum().backward()
    optimizer.step()  # the momentum buffers exist
    checkpoint.Checkpointer(str(tmp_path), every=1, keep=1, is_main=True, parts={"model": model, "optimizer": optimizer},
                            run={}, exports={"backbone.pt": backbone_of}).save(1, wait=True)
    folder = checkpoint.latest(str(tmp_path))
    real = sum(os.path.getsize(os.path.join(folder, f)) for f in ("state.pt", "backbone.pt"))
    assert state_bytes(spec) == pytest.approx(real, rel=0.05)


def test_plan_gives_the_young_daly_interval_and_warns_when_checkpoint_every_is_far_off(tmp_path, monkeypatch):
    from barlow.goodput import SNAPSHOT_BYTES_PER_S
    from barlow.launch.plan import state_bytes

    row = throughput.Measured("NVIDIA-H100-80GB-HBM3", "resnet50", 224, "bf16", 1000.0, "a row for this test")
    monkeypatch.setattr(throughput, "MEASURED", [row])
    stall = state_bytes(parse_spec(PAPER)) / SNAPSHOT_BYTES_PER_S
    interval = (2 * stall * 5000 * 3600 / 4) ** 0.5  # the default node MTBF over 4 nodes
    steps = round(interval / (2048 / (1000.0 * 32)))
    code, out, err = plan_cli(tmp_path, PAPER, "--images", "1281167")
    assert code == 0, err
    rows = out["pretrain"]
    assert rows["interval"].startswith(f"{steps} steps, {interval / 60:.0f} min (Young/Daly")
    assert rows["failures"] == "one every 1250.0 h (4 node(s), cluster.node_mtbf_hours 5000)"
    assert rows["warning"].startswith(f"output.checkpoint_every 500 is far from {steps} ")
    code, out, err = plan_cli(tmp_path, {**PAPER, "output": {"url": "s3://runs/r50", "checkpoint_every": steps}},
                              "--images", "1281167")
    assert "warning" not in out["pretrain"]
    code, out, err = plan_cli(tmp_path, {**PAPER, "cluster": {**PAPER["cluster"], "node_mtbf_hours": 50}},
                              "--images", "1281167")
    assert out["pretrain"]["interval"].startswith(f"{round(steps / 10)} steps")  # 100 x fewer hours: 10 x shorter
