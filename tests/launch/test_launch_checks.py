"""Specs that would build useless pods are refused on every cluster entry point (render, submit, pipeline), each with
one line naming the field and the fix, exit 2, nothing printed or sent; local runs are not held to these rules. The
same table checks the fields a TrainJob cannot honour (refused when the spec loads, as cluster.priority_class is)."""

from __future__ import annotations

import copy

import pytest
import yaml
from typer.testing import CliRunner

from barlow.cli import app
from barlow.launch.checks import cluster_run_problems
from barlow.spec import parse_spec, set_path

GOOD = {
    "kind": "pretrain", "name": "demo",
    "data": {"train": "s3://bucket/train", "val": "s3://bucket/val"},
    "output": {"url": "s3://bucket/runs/demo"},
    "runtime": {"nodes": 2, "nproc_per_node": 8, "device": "cuda"},
    "optim": {"batch_size": 256, "epochs": 10, "warmup_epochs": 1},
    "cluster": {"gpus_per_node": 8, "image": "registry.example.com/barlow:0.1.0", "memory": "480Gi", "shm_size": "64Gi"},
}
PVC = {"name": "data", "pvc": "imagenet", "mount_path": "/data"}
EVAL = {**{k: v for k, v in GOOD.items() if k != "optim"}, "kind": "eval", "name": "demo-eval",
        "eval": {"checkpoint": "s3://bucket/runs/demo", "batch_size": 256}, "output": {"url": "s3://bucket/runs/demo/eval"}}
STORE = "use s3://... (or another object store), or a path under a cluster.volumes mount"
WRITE = f"{STORE} of a pvc or nfs volume"


def changed(base: dict, **changes) -> dict:
    data = copy.deepcopy(base)
    for path, value in changes.items():
        data = set_path(data, path.replace("__", "."), value)
    return data


# (spec, the one error line): every refusal
REFUSED = [
    (changed(GOOD, data__train="data/train"),
     f"data.train: 'data/train' is a local path: in a pod it is the container's own ephemeral disk, so the pod does "
     f"not have it; {STORE}"),
    (changed(GOOD, data__val="/mnt/imagenet/val"),
     f"data.val: '/mnt/imagenet/val' is a local path: in a pod it is the container's own ephemeral disk, so the pod "
     f"does not have it; {STORE}"),
    (changed(GOOD, output__url="runs/demo"),
     "output.url: 'runs/demo' is a local path: in a pod it is the container's own ephemeral disk, so checkpoints are "
     f"lost and every restart starts from zero; {WRITE}"),
    (changed(GOOD, output__url="file:///runs/demo"),
     "output.url: 'file:///runs/demo' is a local path: in a pod it is the container's own ephemeral disk, so "
     f"checkpoints are lost and every restart starts from zero; {WRITE}"),
    (changed(GOOD, output__url="memory://runs/demo"),
     "output.url: 'memory://runs/demo' is a local path: in a pod it is the container's own ephemeral disk, so "
     f"checkpoints are lost and every restart starts from zero; {WRITE}"),
    (changed(GOOD, output__url="/data/runs/demo", cluster__volumes=[{**PVC, "read_only": True}]),
     f"output.url: '/data/runs/demo' lies on volume 'data', mounted read_only: set read_only: false, or {WRITE}"),
    (changed(GOOD, output__url="/scratch/runs", cluster__volumes=[{"name": "s", "empty_dir": {}, "mount_path": "/scratch"}]),
     f"output.url: '/scratch/runs' lies on volume 's' (empty_dir), which lives only as long as the pod; {WRITE}"),
    (changed(GOOD, output__url="/etc/cfg/runs", cluster__volumes=[{"name": "c", "config_map": "cfg", "mount_path": "/etc/cfg"}]),
     f"output.url: '/etc/cfg/runs' lies on volume 'c' (config_map), which cannot take writes; {WRITE}"),
    (changed(GOOD, data__train="/scratch/train", cluster__volumes=[{"name": "s", "empty_dir": {}, "mount_path": "/scratch"}]),
     f"data.train: '/scratch/train' lies on volume 's' (empty_dir), which lives only as long as the pod; {STORE}"),
    (changed(GOOD, data__train="/datasets/train", cluster__volumes=[PVC]),  # /datasets is not under /data
     f"data.train: '/datasets/train' is a local path: in a pod it is the container's own ephemeral disk, so the pod "
     f"does not have it; {STORE}"),
    (changed(EVAL, eval__checkpoint="runs/demo"),
     f"eval.checkpoint: 'runs/demo' is a local path: in a pod it is the container's own ephemeral disk, so the pod "
     f"does not have it; {STORE}"),
    (changed(GOOD, runtime__nodes=1, cluster__gpus_per_node=0),
     "cluster.gpus_per_node: runtime.device is cuda but the pods request no GPU: set cluster.gpus_per_node: 8 "
     "(= runtime.nproc_per_node)"),
    (changed(GOOD, runtime__device="cpu"),
     "runtime.device: cpu, while cluster.gpus_per_node holds 8 GPU(s) per pod that would sit idle: set runtime.device "
     "cuda (or auto), or cluster.gpus_per_node 0"),
    (changed(GOOD, cluster__shm_size="480Gi"),
     "cluster.shm_size: 480Gi is not below cluster.memory (480Gi), the limit /dev/shm counts against: lower shm_size "
     "(a quarter of memory is plenty) or raise memory"),
    (changed(GOOD, cluster__shm_size="1Ti"),
     "cluster.shm_size: 1Ti is not below cluster.memory (480Gi), the limit /dev/shm counts against: lower shm_size "
     "(a quarter of memory is plenty) or raise memory"),
    (changed(GOOD, runtime__device="auto", runtime__nodes=1, cluster__gpus_per_node=0),
     "cluster.gpus_per_node: a cluster pretrain with no GPU would take years on real data: set cluster.gpus_per_node "
     "(and runtime.device cuda), or cluster.cpu_only: true if CPU pods are meant"),
    # fields a TrainJob cannot honour: refused when the spec loads
    (changed(GOOD, cluster__image_pull_policy="Always"),
     "cluster.image_pull_policy: a TrainJob cannot set it (its ClusterTrainingRuntime decides): remove it, set it in "
     "the runtime, or use backend pytorchjob"),
    (changed(GOOD, cluster__backoff_limit=10),
     "cluster.backoff_limit: a TrainJob cannot set it (its ClusterTrainingRuntime decides): remove it, set it in the "
     "runtime, or use backend pytorchjob"),
    (changed(GOOD, cluster__clean_pod_policy="All"),
     "cluster.clean_pod_policy: a TrainJob cannot set it (its ClusterTrainingRuntime decides): remove it, set it in "
     "the runtime, or use backend pytorchjob"),
    (changed(GOOD, cluster__priority_class="high"),
     "cluster.priority_class: a TrainJob cannot set its pods' priorityClassName (Trainer v2.3 runtimePatches has no "
     "such field): set it in the runtime, or use cluster.workload_priority_class with Kueue"),
]
IDS = [f"{i}-{line.split(':')[0]}" for i, (_, line) in enumerate(REFUSED)]


@pytest.mark.parametrize("data, line", REFUSED, ids=IDS)
@pytest.mark.parametrize("command", [["render"], ["submit"], ["submit", "--dry-run"]])
def test_each_refusal_is_one_line_exit_2_and_nothing_is_rendered_or_sent(kube, tmp_path, data, line, command):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    stages = ["eval"] if data["kind"] == "eval" else ["pretrain", "pipeline"]
    for stage in stages:
        result = CliRunner().invoke(app, [command[0], stage, str(path), *command[1:]])
        assert result.exit_code == 2, (stage, result.stdout, result.stderr)
        assert result.stderr.splitlines() == [f"error: {line}"], stage
        assert result.stdout == ""
    assert kube.requests == []  # not even a read: the spec is refused before the API is called


@pytest.mark.parametrize("data", [
    GOOD,
    changed(GOOD, data__train="/data/train", data__val="/data/val", cluster__volumes=[{**PVC, "read_only": True}]),
    changed(GOOD, output__url="/data/runs/demo", cluster__volumes=[PVC]),
    changed(GOOD, output__url="file:///shared/runs", cluster__volumes=[{"name": "n", "nfs": {"server": "nfs", "path": "/x"},
                                                                       "mount_path": "/shared"}]),
    changed(GOOD, data__train="/etc/cfg/train", cluster__volumes=[{"name": "c", "config_map": "cfg", "mount_path": "/etc/cfg"}]),
    changed(GOOD, runtime__device="cpu", runtime__nodes=1, cluster__gpus_per_node=0, cluster__cpu_only=True),
    changed(EVAL, runtime__device="cpu", runtime__nodes=1, cluster__gpus_per_node=0),  # an eval on CPU pods: allowed
    changed(GOOD, runtime__device="auto"),
    changed(GOOD, data__train="https://example.com/images"),
], ids=["s3", "data-on-pvc", "output-on-pvc", "output-on-nfs", "data-on-configmap", "cpu-only", "cpu-eval", "auto", "https"])
def test_good_cluster_specs_pass(data):
    assert cluster_run_problems(parse_spec(data)) == ([], [])


def test_a_local_run_is_not_held_to_the_cluster_rules(tmp_path):
    spec = parse_spec(changed(GOOD, data__train="data/train", output__url="runs/demo", runtime__device="cpu",
                              runtime__nodes=1, cluster__gpus_per_node=0))
    assert spec.output.url == "runs/demo"  # the spec itself is valid: `barlow run` takes it
    problems, _ = cluster_run_problems(spec)
    assert [p.split(":")[0] for p in problems] == ["data.train", "output.url", "cluster.gpus_per_node"]
