"""Specs and checks shared by the render tests of both backends (tests/launch/test_launch_*.py)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from barlow.spec import REMOVE, parse_spec, set_path

SECRET = "sentinel-secret-value-never-rendered"

# the small spec the submit tests send to the fake API server (tests/support/fake_kube.py)
SUBMITTED = {
    "kind": "pretrain", "name": "demo",
    "data": {"train": "s3://bucket/train", "val": "s3://bucket/val"},
    "output": {"url": "s3://bucket/runs/demo"},
    "runtime": {"nodes": 2, "nproc_per_node": 4},
    "optim": {"batch_size": 256, "epochs": 10, "warmup_epochs": 1},
    "cluster": {"gpus_per_node": 4, "image": "registry.example.com/barlow:0.1.0"},
}


def submitted(backend: str, **cluster: object) -> dict:
    """SUBMITTED on `backend`, with more `cluster` fields."""
    return {**SUBMITTED, "cluster": {"backend": backend, **SUBMITTED["cluster"], **cluster}}

DATA = {"train": "s3://datasets/imagenet/train-index.json", "val": "s3://datasets/imagenet/val-index.json", "format": "shards",
        "s3": {"endpoint_url": "http://minio.storage:9000", "addressing_style": "path"}}
SPECS = {
    "pretrain-1node-cpu": {
        "kind": "pretrain", "name": "digits-cpu",
        "data": {"train": "s3://datasets/digits/train", "val": "s3://datasets/digits/val", "image_size": 32, "workers": 1},
        "model": {"arch": "resnet18", "small_images": True, "width": 16, "projector": "1024-1024-1024"},
        "optim": {"epochs": 25, "batch_size": 128, "warmup_epochs": 2},
        "runtime": {"nproc_per_node": 2, "device": "cpu"},
        "output": {"url": "s3://runs/digits-cpu"},
        "cluster": {"backend": "pytorchjob", "image": "registry.example.com/barlow:0.1.0", "cpu": "4", "memory": "8Gi",
                    "shm_size": "1Gi", "cpu_only": True},
    },
    "pretrain-4x8gpu": {
        "kind": "pretrain", "name": "imagenet-r50",
        "data": DATA,
        "optim": {"epochs": 300, "batch_size": 2048},
        "runtime": {"nodes": 4, "nproc_per_node": 8, "device": "cuda", "precision": "bf16"},
        "output": {"url": "s3://runs/imagenet-r50", "checkpoint_every": 1000},
        "cluster": {
            "backend": "pytorchjob", "image": "registry.example.com/barlow@sha256:" + "0" * 64, "image_pull_policy": "Always", "namespace": "vision",
            "gpus_per_node": 8, "cpu": "64", "memory": "480Gi", "shm_size": "64Gi",
            "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priority_class": "training-high", "backoff_limit": 10, "active_deadline_seconds": 604800,
            "clean_pod_policy": "Running", "termination_grace_seconds": 300,
        },
    },
    "eval": {
        "kind": "eval", "name": "imagenet-r50-linear",
        "data": DATA,
        "runtime": {"nproc_per_node": 1, "device": "cuda"},
        "eval": {"checkpoint": "s3://runs/imagenet-r50", "epochs": 100, "batch_size": 256},
        "output": {"url": "s3://runs/imagenet-r50/eval"},
        "cluster": {"backend": "pytorchjob", "image": "registry.example.com/barlow:0.1.0", "namespace": "vision",
                    "gpus_per_node": 1, "cpu": 16,
                    "memory": "64Gi", "shm_size": "8Gi", "s3_secret": None},
    },
}
SPECS["pretrain-2x8gpu-gang"] = set_path(set_path(SPECS["pretrain-4x8gpu"], "name", "gang-r50"), "cluster.gang", "volcano")
SPECS["pretrain-2x8gpu-gang"]["runtime"]["nodes"] = 2
SPECS["eval-kueue"] = set_path(set_path(SPECS["eval"], "name", "queued-linear"), "cluster.queue", "gpu-team")


def _trainjob(key: str, **changes) -> dict:
    data = set_path(SPECS[key], "cluster.backend", REMOVE)  # the default
    for field in ("image_pull_policy", "backoff_limit", "clean_pod_policy"):  # a TrainJob's runtime decides them
        data = set_path(data, f"cluster.{field}", REMOVE)
    for path, value in changes.items():
        data = set_path(data, path.replace("__", "."), value)
    return data


# The same runs as TrainJobs; the big one through a Kueue queue (a TrainJob has no pod priorityClassName to set).
TRAINJOB_SPECS = {
    "pretrain-1node-cpu": _trainjob("pretrain-1node-cpu"),
    "pretrain-4x8gpu-kueue": _trainjob("pretrain-4x8gpu", cluster__priority_class=REMOVE, cluster__queue="gpu-team",
                                       cluster__workload_priority_class="training-high"),
    "eval": _trainjob("eval"),
}


def spec(key: str, specs: dict | None = None):
    return parse_spec(copy.deepcopy((specs or SPECS)[key]))


def strict_schema(schema):
    """The CRD schema with unknown fields rejected (the API server silently prunes them: a typo would vanish)."""
    if isinstance(schema, dict):
        out = {k: strict_schema(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    return [strict_schema(v) for v in schema] if isinstance(schema, list) else schema



def torchrun_world(argv: list[str], env: dict[str, str], monkeypatch) -> tuple[int, list[int]]:
    """(world size, global ranks of this node) as torch's own launcher computes them from argv and PET_* variables."""
    from torch.distributed.run import config_from_args, parse_args

    with monkeypatch.context() as m:
        for k in [k for k in os.environ if k.startswith("PET_")]:
            m.delenv(k)
        m.setenv("OMP_NUM_THREADS", "1")  # else the launcher sets it in this process
        for k, v in env.items():
            m.setenv(k, v)
        config, _, _ = config_from_args(parse_args(argv))
        node_rank = config.rdzv_configs.get("rank", 0)
    assert config.min_nodes == config.max_nodes  # a fixed-size job, never elastic
    nproc = config.nproc_per_node
    return config.max_nodes * nproc, [node_rank * nproc + local for local in range(nproc)]


def check_golden(path: Path, text: str) -> None:
    """`text` equals the golden file at `path`; BARLOW_UPDATE_GOLDEN=1 rewrites the file first (an intended change)."""
    if os.environ.get("BARLOW_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with BARLOW_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{path.name} differs: if intended, regenerate with BARLOW_UPDATE_GOLDEN=1"
