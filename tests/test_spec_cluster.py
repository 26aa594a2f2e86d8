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
])
def test_good_cluster_fields_resolve(fields, field, want):
    assert getattr(parse_spec(cluster(**fields)).cluster, field) == want


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
