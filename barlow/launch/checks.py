"""The rules for running a spec on a cluster, beyond those every spec meets: a local `barlow run` may read and write
local paths and train on the CPU; a pod may not usefully. `render` calls `check_cluster_run` for each run it renders,
so every cluster entry point (render, submit, the pipeline and its follow-up) gets them. Nothing here imports torch."""

from __future__ import annotations

import posixpath
import warnings
from urllib.parse import urlparse

from kubernetes.utils import parse_quantity

from barlow.spec import EvalRunSpec, RunSpec, SpecError, VolumeSpec

LOCAL_SCHEMES = ("", "file", "memory")  # what a pod keeps only on its own ephemeral disk (or in its memory)
PERSISTENT = ("pvc", "nfs")  # volume sources that outlive the pod and can take writes


class ClusterWarning(UserWarning):
    """A cluster run that works, but perhaps not as meant (the CLI prints it as one `warning:` line)."""


def _local_path(url: str) -> str | None:
    """The local path a URL names, or None for object storage and http(s)."""
    scheme = urlparse(url).scheme if "://" in url else ""
    if scheme not in LOCAL_SCHEMES:
        return None
    return urlparse(url).path if scheme == "file" else ("/" + url.split("://", 1)[1] if scheme == "memory" else url)


def _volume_under(path: str, volumes: list[VolumeSpec]) -> VolumeSpec | None:
    if not posixpath.isabs(path) or "://" in path:
        return None
    path = posixpath.normpath(path)
    for v in volumes:
        mount = posixpath.normpath(v.mount_path)
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            return v
    return None


def _path_problem(field: str, url: str, volumes: list[VolumeSpec], writes: bool) -> str | None:
    path = _local_path(url)
    if path is None:
        return None
    volume = _volume_under(path, volumes)
    lost = ("checkpoints are lost and every restart starts from zero" if writes
            else "the pod does not have it")
    fix = ("use s3://... (or another object store), or a path under a cluster.volumes mount of a pvc or nfs volume"
           if writes else "use s3://... (or another object store), or a path under a cluster.volumes mount")
    if volume is None:
        return f"{field}: '{url}' is a local path: in a pod it is the container's own ephemeral disk, so {lost}; {fix}"
    if volume.empty_dir is not None or (writes and volume.source not in PERSISTENT):
        return (f"{field}: '{url}' lies on volume '{volume.name}' ({volume.source}), which "
                f"{'lives only as long as the pod' if volume.empty_dir is not None else 'cannot take writes'}; {fix}")
    if writes and volume.read_only:
        return f"{field}: '{url}' lies on volume '{volume.name}', mounted read_only: set read_only: false, or {fix}"
    return None


def cluster_run_problems(spec: RunSpec) -> tuple[list[str], list[str]]:
    """(problems, warnings) of running `spec` on a cluster, one `field: message` line each."""
    c, r = spec.cluster, spec.runtime
    reads = {"data.train": spec.data.train, "data.val": spec.data.val}
    if isinstance(spec, EvalRunSpec):
        reads |= {"eval.checkpoint": spec.eval.checkpoint, "eval.backbone": spec.eval.backbone}
    paths = [_path_problem(field, url, c.volumes, writes=False) for field, url in reads.items() if url]
    problems = [p for p in [*paths, _path_problem("output.url", spec.output.url, c.volumes, writes=True)] if p]
    if r.device == "cuda" and not c.gpus_per_node:
        problems.append(f"cluster.gpus_per_node: runtime.device is cuda but the pods request no GPU: set "
                        f"cluster.gpus_per_node: {r.nproc_per_node} (= runtime.nproc_per_node)")
    if r.device == "cpu" and c.gpus_per_node:
        problems.append(f"runtime.device: cpu, while cluster.gpus_per_node holds {c.gpus_per_node} GPU(s) per pod that "
                        "would sit idle: set runtime.device cuda (or auto), or cluster.gpus_per_node 0")
    if parse_quantity(c.shm_size) >= parse_quantity(c.memory):
        problems.append(f"cluster.shm_size: {c.shm_size} is not below cluster.memory ({c.memory}), the limit /dev/shm "
                        "counts against: lower shm_size (a quarter of memory is plenty) or raise memory")
    if spec.kind == "pretrain" and not c.gpus_per_node and r.device != "cuda" and not c.cpu_only:
        problems.append("cluster.gpus_per_node: a cluster pretrain with no GPU would take years on real data: set "
                        "cluster.gpus_per_node (and runtime.device cuda), or cluster.cpu_only: true if CPU pods are meant")
    warns = []
    if c.queue and c.backend == "pytorchjob":
        warns.append("cluster.queue: Kueue >= 0.19 disables its PyTorchJob (kubeflow.org/v1) integration by default: "
                     "the job runs unqueued unless the cluster's Kueue enables it; backend trainjob is integrated by default")
    return problems, warns


def check_cluster_run(spec: RunSpec, source: str | None = None) -> None:
    """Raise SpecError (one line per problem, exit 2 in the CLI) where `spec` cannot usefully run on a cluster, and
    warn (ClusterWarning) for what runs but perhaps not as meant. Local runs never call this."""
    problems, warns = cluster_run_problems(spec)
    for line in warns:
        warnings.warn(line, ClusterWarning, stacklevel=2)
    if problems:
        raise SpecError(problems, source)
