"""The seam between barlow and a cluster's training operator, and the registry of backends.

What differs between a Kubeflow PyTorchJob (training operator v1) and a TrainJob (Trainer v2) is the object rendered,
where the API serves it, how its status reads, and how its pods are labelled: a `Backend` holds exactly that. The
verbs (submit, status, logs, wait, delete, list) are the same custom-object calls for every backend and live in
`barlow.launch.cluster`. Each backend module registers itself here when imported; `get` imports the module that
`barlow.spec.BACKENDS` names for a backend on first use, so a new backend is its module and its line there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from barlow.spec import BACKENDS, RunSpec

FAILED = "Failed"  # the condition of a failed job, the same in every Kubeflow operator
QUEUED = "Queued"  # suspended (by Kueue until the queue admits it): waiting, not failed


@dataclass(frozen=True)
class Backend:
    """One kind of training job: its API resource, how to render it, how to read its status, how to find its pods."""

    name: str  # the value of cluster.backend
    group: str
    version: str
    plural: str
    kind: str
    container: str  # the training container's name (logs read it)
    build: Callable[[RunSpec], dict[str, Any]]  # the job for a spec, as the API server receives it
    pod_selector: Callable[[str, str], str]  # (job name, replica) -> label selector of that replica's pods
    phase: Callable[[dict[str, Any]], tuple[str, str]]  # the job object -> (phase, message)
    replicas: Callable[[dict[str, Any]], dict[str, dict[str, int]]]  # the job's status -> counts per replica group
    succeeded: str  # the condition (and phase) that means the job succeeded
    installs: str  # what to install when the CRD is missing

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def what(self) -> str:
        """How messages name one of these jobs."""
        return self.kind.lower()

    @property
    def crd_missing(self) -> str:
        return (f"the {self.kind} CRD ({self.plural}.{self.group}/{self.version}) is not installed in this cluster: "
                f"install {self.installs} (README: Run on a cluster), or choose another cluster.backend")


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend under its name (a value of the spec's cluster.backend); returns it, for `BACKEND = register(...)`."""
    if backend.name not in BACKENDS:
        raise ValueError(f"backend '{backend.name}' is not a cluster.backend value (barlow.spec.BACKENDS)")
    if backend.name in _REGISTRY and _REGISTRY[backend.name] is not backend:
        raise ValueError(f"backend '{backend.name}' is registered twice")
    _REGISTRY[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    """The registered backend called `name` (its module, named in barlow.spec.BACKENDS, imported on first use)."""
    if name not in _REGISTRY and name in BACKENDS:
        importlib.import_module(BACKENDS[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend '{name}' (registered: {', '.join(sorted(_REGISTRY)) or 'none'})") from None


def of(spec: RunSpec) -> Backend:
    """The backend a spec asks for (cluster.backend)."""
    return get(spec.cluster.backend)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def condition_phase(obj: dict[str, Any], succeeded: str) -> tuple[str, str] | None:
    """(phase, message) from a Kubeflow job's conditions: a final condition wins; a suspended job (Kueue holds it) is
    Queued; else the latest true condition. None where no condition is true and the job is not suspended."""
    true = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    by_type = {c.get("type"): c for c in true}
    for final in (succeeded, FAILED):
        if final in by_type:
            return final, _one_line(by_type[final].get("message", ""))
    spec = obj.get("spec") or {}
    if "Suspended" in by_type or spec.get("suspend") or (spec.get("runPolicy") or {}).get("suspend"):
        held = by_type.get("Suspended") or {}
        return QUEUED, _one_line(held.get("message", "") or "suspended until its queue admits it")
    if true:
        return true[-1].get("type", "Pending"), _one_line(true[-1].get("message", ""))
    return None


def counts(entry: dict[str, Any] | None) -> dict[str, int]:
    """The integer counters of one status entry (active, succeeded, failed, ...)."""
    return {k: n for k, n in (entry or {}).items() if isinstance(n, int) and not isinstance(n, bool)}
