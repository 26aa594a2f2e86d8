"""A team's own data end to end: unlabelled folders (flat, nested by date, on S3), WebDataset shards with and
without labels and a parquet set pretrain through `barlow run` on the CPU with every step done and resume mid-epoch
exactly after SIGKILL; the pipeline of unlabelled data evaluates on the labelled set eval.data names, and is refused
without one; an old checkpoint resumes with the probe fresh."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from imagesets import write_hf_parquet, write_unlabelled_folder, write_wds
from runner import barlow, kill_after_first_checkpoint, tiny_spec, write_spec

from barlow import checkpoint, storage

pytestmark = pytest.mark.slow

IMAGES = 160  # 5 steps an epoch at a global batch of 32: fast, and long enough to be killed mid-run


def own_spec(train: str, out, **overrides) -> dict:
    spec = tiny_spec(Path("unused"), out, **{"data.train": train, "data.val": None, "optim.batch_size": 32, "optim.epochs": 4,
                                     "output.checkpoint_every": 3, **overrides})
    return spec


def weights(out) -> dict[str, torch.Tensor]:
    return checkpoint.load(checkpoint.latest(str(out)))["model"]


@pytest.fixture(params=["flat", "dated", "s3-dated", "wds-cls", "wds-none", "parquet"])
def own_data(request, tmp_path) -> tuple[str, dict, str]:
    if request.param == "parquet":
        write_hf_parquet(tmp_path / "pq", IMAGES, files=2, row_group=16)
        return str(tmp_path / "pq"), {"data.format": "parquet"}, f"{IMAGES} images in 2 parquet files, 3 classes"
    if request.param.startswith("wds"):
        label = request.param.removeprefix("wds-")
        write_wds(tmp_path / "shards", IMAGES, 4, label)
        classes = "3 classes" if label == "cls" else "unlabelled"
        return (str(tmp_path / "shards" / "shard-{000000..000003}.tar"), {"data.format": "webdataset"},
                f"{IMAGES} images in 4 WebDataset shards, {classes}")
    layout = request.param.removeprefix("s3-")
    write_unlabelled_folder(tmp_path / "photos", IMAGES, layout)
    described = f"{IMAGES} images, unlabelled ({'flat folder' if layout == 'flat' else 'nested folders'})"
    if not request.param.startswith("s3"):
        return str(tmp_path / "photos"), {}, described
    s3 = request.getfixturevalue("s3")
    fs, _ = storage.filesystem(s3.url, s3.settings)
    fs.put(str(tmp_path / "photos"), f"{s3.url}/photos", recursive=True)
    return f"{s3.url}/photos", {"data.s3": {"endpoint_url": s3.server.endpoint_url}}, described


def test_unlabelled_folder_pretrains_and_resumes_exactly_after_sigkill(own_data, tmp_path):
    train, extra, described = own_data
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = barlow("run", "pretrain", str(write_spec(tmp_path, own_spec(train, straight, **extra))))
    assert done.returncode == 0, done.stderr[-3000:]
    assert described in done.stdout
    if "unlabelled" in described:
        assert "monitor: data.train has no labels: online probe off; kNN off" in done.stdout
    assert json.loads((straight / "data" / "index-train.json").read_text())["url"] == train  # listed once, kept
    total = checkpoint.load(checkpoint.latest(str(straight)))["step"]
    assert total == IMAGES // 32 * 4  # every step done

    spec_killed = write_spec(tmp_path, own_spec(train, killed, **extra))
    at_kill = kill_after_first_checkpoint(spec_killed, killed)
    assert 0 < at_kill < total and at_kill % 5  # mid-epoch
    resumed = barlow("run", "pretrain", str(spec_killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {at_kill}" in resumed.stdout
    a, b = weights(straight), weights(killed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs after resume")


def test_pipeline_of_unlabelled_data_evaluates_on_eval_data_and_is_refused_without(demo_data, tmp_path):
    write_unlabelled_folder(tmp_path / "photos", IMAGES, "dated")
    train = str(tmp_path / "photos")
    refused = tmp_path / "refused"
    result = barlow("run", "pipeline", str(write_spec(tmp_path, own_spec(train, refused))))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "eval.data: the pretraining data has no labels" in result.stderr and "set eval.data" in result.stderr
    assert not refused.exists()  # refused before anything ran

    out = tmp_path / "run"
    labelled = {"train": str(demo_data / "train"), "val": str(demo_data / "val")}
    spec = own_spec(train, out, **{"eval.data": labelled, "monitor.data": labelled, "monitor.knn_every_epochs": 2,
                                   "monitor.knn_images": 100, "monitor.knn_train_images": 200, "eval.epochs": 2,
                                   "runtime.nproc_per_node": 1})
    result = barlow("run", "pipeline", str(write_spec(tmp_path, spec)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "monitor: data.train has no labels: online probe off; kNN every 2 epoch(s)" in result.stdout
    assert "of monitor.data" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1" in r for r in rows) and not any("probe_top1" in r for r in rows)
    ranks = [r for r in rows if "rankme_projector" in r]  # the label-free monitor: 160 images, every 17 epochs: at the end
    assert len(ranks) == 1 and all(1.0 <= r["rankme_projector"] <= 128 and 0 <= r["constant_dims"] <= 1 for r in ranks)
    assert "RankMe every 17 epoch(s) on 160 fixed train images" in result.stdout
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["val_images"] == len(list((demo_data / "val").rglob("*.jpg")))  # the labelled set's val


def test_a_checkpoint_from_before_the_probe_resumes_with_the_probe_fresh(demo_data, tmp_path):
    out = tmp_path / "run"
    spec = write_spec(tmp_path, tiny_spec(demo_data, out, **{"runtime.nproc_per_node": 1, "optim.epochs": 2,
                                                             "monitor.knn_every_epochs": 0, "data.val": None}))
    assert barlow("run", "pretrain", str(spec)).returncode == 0
    latest = checkpoint.latest(str(out))
    state = checkpoint.load(latest)
    assert "probe" in state
    del state["probe"]  # the layout of a checkpoint written before the online probe existed
    torch.save(state, f"{latest}/state.pt")
    again = barlow("run", "pretrain", str(spec))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resume: the checkpoint has no probe state (written before it existed): probe starts fresh" in again.stdout
