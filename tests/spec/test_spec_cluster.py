"""The cluster section's fields and rules (backend, queue, gang, max_restarts, cpu as a number, no default image),
table-driven, plus the one override helper (spec.set_path / spec.with_fields)."""

from __future__ import annotations

import pytest

from barlow.spec import REMOVE, SpecError, parse_spec, set_path, with_fields

GOOD = {"kind": "pretrain", "name": "demo", "data": {"train": "data/train", "val": "data/val"},
        "output": {"url": "runs/demo"}, "optim": {"epochs": 10, "warmup_epochs": 1, "batch_size": 64}}


def cluster(**fields) -> dict:
    return {**GOOD, "cluster": fields}


@pytest.mark.parametrize("fields, field, want", [
    ({"cpu": 8}, "cpu", "8"),
    ({"cpu": 0.5}, "cpu", "0.5"),
    ({"cpu": "500m"}, "cpu", "500m"),
    ({"memory": 64}, "memory", "64"),
    ({}, "backend", "trainjob"),
    ({"backend": "pytorchjob"}, "backend", "pytorchjob"),
    ({}, "image_pull_policy", None),
    ({"backend": "pytorchjob", "image_pull_policy": "Always", "backoff_limit": 0, "clean_pod_policy": "All"},
     "backoff_limit", 0),
    ({}, "training_runtime", "torch-distributed"),
    ({}, "image", None),
    ({}, "max_restarts", 5),
    ({"max_restarts": 0}, "max_restarts", 0),
    ({"queue": "gpu-team", "workload_priority_class": "high"}, "queue", "gpu-team"),
    ({"backend": "pytorchjob", "gang": "volcano", "priority_class": "high"}, "gang", "volcano"),
    ({"backend": "trainjob", "queue": "q"}, "queue", "q"),
    ({"env": {"NCCL_IB_GID_INDEX": 3, "TOKEN_FILE_PATH_SECRET": {"secret": "s", "key": "k"}}}, "env",
     {"NCCL_IB_GID_INDEX": "3", "TOKEN_FILE_PATH_SECRET": {"secret": "s", "key": "k", "config_map": None}}),
    ({"extra_resources": {"rdma/rdma_shared_device_a": 1}}, "extra_resources", {"rdma/rdma_shared_device_a": "1"}),
    ({"volumes": [{"name": "d", "pvc": "data", "mount_path": "/data"}]}, "volumes",
     [{"name": "d", "mount_path": "/data", "read_only": False, "pvc": "data", "nfs": None, "config_map": None,
       "empty_dir": None}]),
])
def test_good_cluster_fields_resolve(fields, field, want):
    assert parse_spec(cluster(**fields)).cluster.model_dump()[field] == want


@pytest.mark.parametrize("fields, line", [
    ({"cpu": True}, "cluster.cpu: Input should be a valid string"),
    ({"cpu": "8 cores"}, "cluster.cpu: '8 cores' is not a Kubernetes quantity"),
    ({"cpu": -1}, "cluster.cpu: '-1' is not a Kubernetes quantity"),
    ({"backend": "mpijob"}, "cluster.backend: Input should be 'pytorchjob' or 'trainjob'"),
    ({"gang": "kueue"}, "cluster.gang: Input should be 'none', 'volcano' or 'scheduler-plugins'"),
    ({"max_restarts": -1}, "cluster.max_restarts: Input should be greater than or equal to 0"),
    ({"queue": "Team A"}, "cluster.queue: 'Team A' is not a valid Kubernetes name"),
    ({"image": ""}, "cluster.image: String should have at least 1 character"),
    ({"backend": "trainjob", "gang": "volcano"}, "cluster.gang: is for backend pytorchjob"),
    ({"backend": "trainjob", "priority_class": "high"}, "cluster.priority_class: a TrainJob cannot set its pods' "
                                                        "priorityClassName"),
    ({"backend": "pytorchjob", "gang": "volcano", "queue": "q"}, "cluster.queue: Kueue (cluster.queue) admits a job "
                                                                 "whole already"),
    ({"image_pull_policy": "Always"}, "cluster.image_pull_policy: a TrainJob cannot set it (its ClusterTrainingRuntime "
                                      "decides): remove it, set it in the runtime, or use backend pytorchjob"),
    ({"backoff_limit": 3}, "cluster.backoff_limit: a TrainJob cannot set it"),
    ({"clean_pod_policy": "None"}, "cluster.clean_pod_policy: a TrainJob cannot set it"),
    ({"workload_priority_class": "high"}, "cluster.workload_priority_class: is read by Kueue: set cluster.queue too"),
    ({"max_restart": 3}, "cluster.max_restart: unknown field (did you mean 'max_restarts'?)"),
    ({"env": {"1X": "a"}}, "cluster.env: '1X' is not a valid environment variable name"),
    ({"env": {"BARLOW_SPEC": "a"}}, "cluster.env: BARLOW_SPEC is set by barlow or the training operator; remove it"),
    ({"env": {"PET_NNODES": "2"}}, "cluster.env: PET_NNODES is set by barlow or the training operator; remove it"),
    ({"env": {"WANDB_API_KEY": "abc"}}, "cluster.env: WANDB_API_KEY looks like a credential: give it as {secret: "
                                        "<Secret>, key: <key>}, never as a value in the spec"),
    ({"env": {"A": {"secret": "s"}}}, "cluster.env: A: key: required field is missing"),
    ({"env": {"A": {"secret": "s", "config_map": "c", "key": "k"}}}, "cluster.env: A: set one of secret or config_map"),
    ({"env": {"A": [1]}}, "cluster.env: A: must be a value or {secret: NAME, key: KEY} / {config_map: NAME, key: KEY}"),
    ({"image_pull_secrets": ["Regcred"]}, "cluster.image_pull_secrets: 'Regcred' is not a valid Kubernetes name"),
    ({"volumes": [{"name": "a", "mount_path": "/a"}]}, "cluster.volumes.0: volume 'a': set exactly one of pvc, nfs, "
                                                       "config_map, empty_dir"),
    ({"volumes": [{"name": "a", "mount_path": "/a", "pvc": "x", "config_map": "y"}]},
     "cluster.volumes.0: volume 'a': set exactly one of pvc, nfs, config_map, empty_dir (got pvc, config_map)"),
    ({"volumes": [{"name": "a", "mount_path": "data", "pvc": "x"}]}, "cluster.volumes.0.mount_path: String should match "
                                                                     "pattern '^/'"),
    ({"volumes": [{"name": "a", "mount_path": "/a", "pvc": "x"}, {"name": "b", "mount_path": "/a/", "pvc": "y"}]},
     "cluster.volumes: mount_path /a used twice"),
    ({"volumes": [{"name": "dshm", "mount_path": "/x", "empty_dir": {}}]}, "cluster.volumes: name dshm used twice"),
    ({"volumes": [{"name": "a", "mount_path": "/x", "nfs": {"server": "s", "path": "p"}}]},
     "cluster.volumes.0.nfs.path: String should match pattern '^/'"),
    ({"annotations": {"bad key!": "x"}}, "cluster.annotations: 'bad key!' is not a valid key"),
    ({"pod_labels": {"barlow.dev/run": "x"}}, "cluster.pod_labels: 'barlow.dev/run' is one of barlow's own labels"),
    ({"pod_labels": {"team": "a b"}}, "cluster.pod_labels: label team: 'a b' is not a valid label value"),
    ({"extra_resources": {"rdma": 1}}, "cluster.extra_resources: 'rdma' is not an extended resource name"),
    ({"extra_resources": {"nvidia.com/gpu": 8}}, "cluster.extra_resources: nvidia.com/gpu: use cluster.gpus_per_node"),
    ({"extra_resources": {"rdma/hca": "500m"}}, "cluster.extra_resources: rdma/hca: '500m' must be a whole number"),
    ({"affinity": {"nodeAffinty": {}}}, "cluster.affinity: unknown key(s) ['nodeAffinty']"),
    ({"pod_patch": {"containers": []}}, "cluster.pod_patch: unknown key(s) ['containers']: a pod template patch has "
                                        "metadata and spec"),
])
def test_bad_cluster_fields_are_one_line_each(fields, line):
    with pytest.raises(SpecError) as err:
        parse_spec(cluster(**fields))
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(line), err.value.problems


def test_set_path_copies_and_removes():
    data = {"a": {"b": 1}}
    assert set_path(data, "a.c.d", 2) == {"a": {"b": 1, "c": {"d": 2}}} and data == {"a": {"b": 1}}
    assert set_path(data, "a.b", REMOVE) == {"a": {}}


def test_with_fields_validates_again_and_names_the_source():
    spec = parse_spec(GOOD)
    assert with_fields(spec, {"cluster.namespace": "vision"}).cluster.namespace == "vision"
    with pytest.raises(SpecError) as err:
        with_fields(spec, {"runtime.nproc_per_node": 3}, "--nproc")
    assert err.value.source == "--nproc" and err.value.problems == ["optim.batch_size: must be divisible by 3 "
                                                                     "(nodes × nproc_per_node)"]
