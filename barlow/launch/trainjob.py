"""The `trainjob` backend: a run spec as a Kubeflow Trainer v2 `TrainJob` (trainer.kubeflow.org/v1alpha1).

The TrainJob names a ClusterTrainingRuntime (`cluster.training_runtime`, default `torch-distributed`: one JobSet
replicated job `node`, container `node`) and fills in the trainer; what the runtime's pod template lacks (/dev/shm,
placement, service account, security context) goes in through `runtimePatches`. The torch plugin injects PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT (and rejects a TrainJob that sets them), from
which `barlow.torchrun` builds the same world as under a PyTorchJob.

Plain dicts, not the `kubeflow-trainer-api` models: see README "Run on a cluster" for why. The tests hold them to the
real CRD, strictly (tests/test_launch_trainjob.py).
"""

from __future__ import annotations

from typing import Any

from barlow.launch.backend import Backend, condition_phase, counts, register
from barlow.launch.manifest import (
    ANNOTATION_OUTPUT,
    COMMAND,
    S3_KEYS,
    RenderError,
    image,
    job_labels,
    job_name,
    labels,
    quantities,
    security,
    shm,
    to_dict,
    tolerations,
    training_env,
)
from barlow.spec import RunSpec

GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
CONTAINER = "node"  # the torch-distributed runtime's container (and replicated job) name
REPLICATED_JOB = "node"
PATCH_MANAGER = "barlow.dev/render"  # who owns our runtime patch (Kueue adds its own beside it)
# Labels JobSet and the Job controller put on the pods (`barlow logs` selects on them).
JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
JOBSET_REPLICATED_JOB = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def _env(spec: RunSpec) -> list[dict[str, Any]]:
    env = to_dict(training_env(spec))
    if spec.cluster.s3_secret:  # credentials only by reference: the trainer has env, not envFrom
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": spec.cluster.s3_secret, "key": key}}}
                for key in S3_KEYS]
    return env


def _pod_patch(spec: RunSpec) -> dict[str, Any]:
    c = spec.cluster
    pod_security, container_security = security()
    volume, mount = shm(spec)
    pod = {
        "containers": [{"name": CONTAINER, "volumeMounts": to_dict([mount]), "securityContext": to_dict(container_security)}],
        "volumes": to_dict([volume]),
        "nodeSelector": c.node_selector or None,
        "tolerations": to_dict(tolerations(spec)),
        "serviceAccountName": c.service_account,
        "terminationGracePeriodSeconds": c.termination_grace_seconds,
        "securityContext": to_dict(pod_security),
    }
    return {"metadata": {"labels": labels(spec)}, "spec": {k: v for k, v in pod.items() if v is not None}}


def build_trainjob(spec: RunSpec) -> dict[str, Any]:
    """The TrainJob that runs `spec` (pretrain or eval): numNodes pods of the runtime, each one torchrun."""
    c, r = spec.cluster, spec.runtime
    trainer = {
        "image": image(spec),
        "command": COMMAND,
        "numNodes": r.nodes,
        "numProcPerNode": r.nproc_per_node,
        "resourcesPerNode": {"requests": quantities(spec), "limits": quantities(spec)},
        "env": _env(spec),
    }
    replicated_job = {"name": REPLICATED_JOB, "template": {"spec": {"template": _pod_patch(spec)}}}
    job_spec = {
        "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": c.training_runtime},
        "trainer": trainer,
        "runtimePatches": [{"manager": PATCH_MANAGER,
                            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [replicated_job]}}}}],
    }
    if c.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = c.active_deadline_seconds
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": job_name(spec), "namespace": c.namespace, "labels": job_labels(spec),
                     "annotations": {ANNOTATION_OUTPUT: spec.output.url}},
        "spec": job_spec,
    }


def pod_selector(name: str, replica: str) -> str:
    """node-N (N from 0: the node rank); master is node-0."""
    kind, _, number = replica.partition("-")
    if replica == "master":
        index = 0
    elif kind == "node" and number.isdigit():
        index = int(number)
    else:
        raise RenderError(f"--replica must be master or node-N (N from 0, the node rank) for a TrainJob, not '{replica}'")
    return f"{JOBSET_NAME}={name},{JOBSET_REPLICATED_JOB}={REPLICATED_JOB},{COMPLETION_INDEX}={index}"


def phase(obj: dict[str, Any]) -> tuple[str, str]:
    """Complete or Failed, Queued while suspended; a TrainJob has no Running condition: its JobSet's jobs tell."""
    found = condition_phase(obj, SUCCEEDED)
    if found:
        return found
    running = any(j.get("active") or j.get("ready") for j in (obj.get("status") or {}).get("jobsStatus") or [])
    return ("Running", "") if running else ("Pending", "")


def replicas(status: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Counts per JobSet replicated job (node)."""
    return {j.get("name", "?"): counts(j) for j in status.get("jobsStatus") or []}


SUCCEEDED = "Complete"
BACKEND = register(Backend(
    name="trainjob", group=GROUP, version=VERSION, plural="trainjobs", kind="TrainJob", container=CONTAINER,
    build=build_trainjob, pod_selector=pod_selector, phase=phase, replicas=replicas, succeeded=SUCCEEDED,
    installs="Kubeflow Trainer v2 (with its torch-distributed ClusterTrainingRuntime)"))
