"""The whole pipeline from and to s3:// on the real SeaweedFS server: shard the demo set into the bucket, pretrain
from the shards with checkpoints in the bucket, evaluate from there; no credential lands in anything written."""

from __future__ import annotations

import json

import pytest
from runner import barlow, tiny_spec, write_spec
from s3server import s3_files_contain

from barlow import checkpoint, storage

pytestmark = pytest.mark.slow


def test_shard_pretrain_eval_all_in_s3(demo_data, s3, tmp_path):
    data = f"{s3.url}/imagenet-like"
    for split in ("train", "val"):
        made = barlow("data", "shard", str(demo_data / split), f"{data}/{split}", "--shard-size-mb", "1",
                      "--endpoint-url", s3.server.endpoint_url)
        assert made.returncode == 0, made.stderr[-2000:]

    out = f"{s3.url}/run"
    spec = tiny_spec(demo_data, out, **{"eval.epochs": 20})  # the probe of a 3-epoch backbone needs the epochs: 45.6 % (6 gave 37.9)
    spec["data"].update(format="shards", train=f"{data}/train/index.json", val=f"{data}/val/index.json",
                        shuffle_buffer=200, s3={"endpoint_url": s3.server.endpoint_url, "retries": 10})
    result = barlow("run", "pipeline", str(write_spec(tmp_path, spec)))
    assert result.returncode == 0, result.stderr[-3000:]

    results = json.loads(storage.read_text(f"{out}/eval/results.json"))
    assert results["top1"] > 40.0 and results["checkpoint"] == out, results  # 10 classes: chance is 10 %
    assert storage.exists(f"{out}/backbone.pt")
    steps = storage.list_names(checkpoint.folder(out))
    assert checkpoint.latest(out) and 1 <= len(steps) <= spec["output"]["keep"], steps  # keep-K works on S3 too

    secrets = [s3.access_key, s3.secret_key]
    assert s3_files_contain(s3.server, s3.url, [s.encode() for s in secrets]) == []
    assert not any(s in result.stdout + result.stderr for s in secrets)


def test_an_eval_on_an_s3_endpoint_reports_its_results(demo_data, s3, tmp_path, monkeypatch):
    """The endpoint is only in the spec (data.s3), as on a non-AWS store: the CLI reads results.json with it too."""
    import torch

    from barlow.model import build_backbone

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # else botocore would find the endpoint without the spec
    torch.save(build_backbone("resnet18", small_images=True, width=8).state_dict(), tmp_path / "backbone.pt")
    spec = tiny_spec(demo_data, tmp_path / "unused")
    spec = {k: spec[k] for k in ("data", "model")} | {
        "kind": "eval", "name": "ev", "runtime": {"nproc_per_node": 1, "device": "cpu"},
        "output": {"url": f"{s3.url}/eval"},
        "eval": {"epochs": 1, "batch_size": 64, "train_percent": 10, "backbone": str(tmp_path / "backbone.pt")}}
    spec["data"]["s3"] = {"endpoint_url": s3.server.endpoint_url, "retries": 2}
    result = barlow("run", "eval", str(write_spec(tmp_path, spec)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"on 364 val images -> {s3.url}/eval/results.json" in result.stdout
