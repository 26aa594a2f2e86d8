"""The launch seam: the backend registry, status parsing asked of each backend, and an import graph of
barlow.launch without circles (the registry imports no backend; backends register themselves)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from barlow.launch import backend
from barlow.launch.render import render  # noqa: F401  registers the built-in backends
from barlow.spec import BACKENDS

LAUNCH = Path(__file__).resolve().parents[2] / "barlow" / "launch"


def test_every_spec_backend_is_registered_under_its_name():
    assert [backend.get(name).name for name in BACKENDS] == list(BACKENDS)


@pytest.mark.parametrize("change, message", [
    ({"name": "slurm"}, "backend 'slurm' is not a cluster.backend value"),
    ({"kind": "OtherJob"}, "backend 'trainjob' is registered twice"),
])
def test_register_refuses_an_unknown_name_or_a_second_backend_of_a_name(change, message):
    other = dataclasses.replace(backend.get("trainjob"), **change)
    with pytest.raises(ValueError, match=message):
        backend.register(other)
    assert backend.get("trainjob").kind == "TrainJob"


def test_an_unknown_backend_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown backend 'slurm' \\(registered: pytorchjob, trainjob\\)"):
        backend.get("slurm")


def _true(kind: str, message: str = "") -> dict:
    return {"type": kind, "status": "True", "message": message}


# (backend, job object, phase, message): status bodies as the training operator v1, Trainer v2.3 and Kueue write them
PHASES = [
    ("pytorchjob", {}, "Pending", ""),
    ("pytorchjob", {"status": {"conditions": [_true("Created"), _true("Running", "PyTorchJob demo is running.")]}},
     "Running", "PyTorchJob demo is running."),
    ("pytorchjob", {"status": {"conditions": [_true("Running"), _true("Succeeded", "done")]}}, "Succeeded", "done"),
    ("pytorchjob", {"status": {"conditions": [_true("Succeeded"), _true("Restarting")]}}, "Succeeded", ""),
    ("pytorchjob", {"spec": {"runPolicy": {"suspend": True}}}, "Queued", "suspended until its queue admits it"),
    ("pytorchjob", {"status": {"conditions": [_true("Failed", "pod  failed\nexit 1")]}}, "Failed", "pod failed exit 1"),
    ("trainjob", {}, "Pending", ""),
    ("trainjob", {"spec": {"suspend": True}, "status": {"conditions": [_true("Suspended", "waiting for quota")]}},
     "Queued", "waiting for quota"),
    ("trainjob", {"status": {"jobsStatus": [{"name": "node", "active": 2, "ready": 0}]}}, "Running", ""),
    ("trainjob", {"status": {"jobsStatus": [{"name": "node", "active": 0, "ready": 0}]}}, "Pending", ""),
    ("trainjob", {"status": {"conditions": [_true("Complete", "TrainJob is completed")]}}, "Complete",
     "TrainJob is completed"),
    ("trainjob", {"status": {"conditions": [_true("Failed", "jobset failed")]}}, "Failed", "jobset failed"),
]


@pytest.mark.parametrize("name, obj, phase, message", PHASES)
def test_each_backend_reads_its_own_status(name, obj, phase, message):
    assert backend.get(name).phase(obj) == (phase, message)


@pytest.mark.parametrize("name, status, replicas", [
    ("pytorchjob", {"replicaStatuses": {"Master": {"active": 1, "selector": "x"}, "Worker": {"succeeded": 3}}},
     {"Master": {"active": 1}, "Worker": {"succeeded": 3}}),
    ("pytorchjob", {}, {}),
    ("trainjob", {"jobsStatus": [{"name": "node", "active": 2, "ready": 2, "failed": 0}]},
     {"node": {"active": 2, "ready": 2, "failed": 0}}),
    ("trainjob", {}, {}),
])
def test_each_backend_counts_its_own_replicas(name, status, replicas):
    assert backend.get(name).replicas(status) == replicas


def _imports(path: Path) -> set[str]:
    """The barlow.launch modules `path` imports (module-level and inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("barlow.launch"):
            names = [a.name for a in node.names] if node.module == "barlow.launch" else [node.module.rsplit(".", 1)[1]]
            out |= {n for n in names if (LAUNCH / f"{n}.py").exists()}
        elif isinstance(node, ast.Import):
            out |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("barlow.launch.")}
    return out


def test_the_launch_package_has_no_import_circle():
    graph = {p.stem: _imports(p) for p in LAUNCH.glob("*.py") if p.stem != "__init__"}
    assert graph["backend"] == set()  # the registry knows no backend

    def reach(start: str, seen: set[str]) -> set[str]:
        for nxt in graph.get(start, set()) - seen:
            seen.add(nxt)
            reach(nxt, seen)
        return seen

    assert [m for m in graph if m in reach(m, set())] == []
