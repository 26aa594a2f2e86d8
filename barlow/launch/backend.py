"""The seam between barlow and a cluster's training operator: what differs between a Kubeflow PyTorchJob (training
operator v1) and a TrainJob (Trainer v2) is the object rendered, where the API serves it, which condition means
done, and how its pods are labelled. The verbs (submit, status, logs, wait, delete, list) are the same custom-object
calls for both and live in `barlow.launch.cluster`, parameterised by a `Backend`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from barlow.spec import RunSpec

NAMES = ("pytorchjob", "trainjob")


@dataclass(frozen=True)
class Backend:
    """One kind of training job: its API resource, how to render it, and how to find its pods."""

    name: str  # the value of cluster.backend
    group: str
    version: str
    plural: str
    kind: str
    container: str  # the training container's name (logs read it)
    build: Callable[[RunSpec], dict[str, Any]]  # the job for a spec, as the API server receives it
    pod_selector: Callable[[str, str], str]  # (job name, replica) -> label selector of that replica's pods
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


def get(name: str) -> Backend:
    """The backend called `name` (pytorchjob or trainjob)."""
    if name == "pytorchjob":
        from barlow.launch.pytorchjob import BACKEND
    elif name == "trainjob":
        from barlow.launch.trainjob import BACKEND
    else:
        raise ValueError(f"unknown backend '{name}' (use one of: {', '.join(NAMES)})")
    return BACKEND


def of(spec: RunSpec) -> Backend:
    """The backend a spec asks for (cluster.backend)."""
    return get(spec.cluster.backend)
