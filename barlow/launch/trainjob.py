"""The `trainjob` backend: a run spec as a Kubeflow Trainer v2 `TrainJob` (trainer.kubeflow.org/v1alpha1).

The TrainJob names a ClusterTrainingRuntime (`cluster.training_runtime`, default `torch-distributed`: one JobSet
replicated job `node`, container `node`) and fills in the trainer; what the runtime's pod template lacks (/dev/shm,
placement, service account, security context, the spec's volumes, pull secrets, annotations and cluster.pod_patch)
goes in through `runtimePatches`, within what Trainer v2.3 lets a patch carry (PATCHABLE). The torch plugin injects
PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT (and rejects a TrainJob that sets
them), from which `barlow.torchrun` builds the same world as under a PyTorchJob.

Plain dicts, not the `kubeflow-trainer-api` models: see README "Run on a cluster" for why. The tests hold them to the
real CRD, strictly (tests/launch/test_launch_trainjob.py).
"""

from __future__ import annotations

from typing import Any

from barlow.launch.backend import Backend, condition_phase, counts, register
from barlow.launch.manifest import (
    ANNOTATION_OUTPUT,
    COMMAND,
    S3_KEYS,
    RenderError,
    check_affinity,
    check_peer_labels,
    check_pod_template,
    image,
    job_labels,
    job_name,
    pod_labels,
    pull_secrets,
    quantities,
    security,
    shm,
    strategic_merge,
    to_dict,
    tolerations,
    training_env,
    user_env,
    user_volumes,
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
    return env + user_env(spec)


# What Trainer v2.3's runtimePatches can set in a replicated job's pod template (the CRD's schema; held to it by
# tests/launch/test_launch_trainjob.py): cluster.pod_patch may touch only these on a TrainJob.
PATCHABLE = {
    "metadata": {"annotations", "finalizers", "labels", "name", "namespace"},
    "spec": {"affinity", "containers", "imagePullSecrets", "initContainers", "nodeSelector", "schedulingGates",
             "securityContext", "serviceAccountName", "terminationGracePeriodSeconds", "tolerations", "volumes"},
    "containers": {"env", "name", "securityContext", "volumeMounts"},
}


def _unpatchable(pod: dict[str, Any]) -> list[str]:
    """The fields of a patched pod template that a TrainJob's runtimePatches cannot carry."""
    out = [f"{part}.{k}" for part in ("metadata", "spec") for k in pod.get(part) or {} if k not in PATCHABLE[part]]
    for kind in ("containers", "initContainers"):
        for c in (pod.get("spec") or {}).get(kind) or []:
            out += [f"spec.{kind}[{c.get('name', '?')}].{k}" for k in c if k not in PATCHABLE["containers"]]
    return out


def _pod_patch(spec: RunSpec) -> dict[str, Any]:
    """Our runtime patch of the node pod template, with cluster.pod_patch merged in and the result checked."""
    c = spec.cluster
    pod_security, container_security = security()
    volume, mount = shm(spec)
    volumes, mounts = user_volumes(spec)
    pod = {
        "containers": [{"name": CONTAINER, "volumeMounts": [*to_dict([mount]), *mounts],
                        "securityContext": to_dict(container_security)}],
        "volumes": [*to_dict([volume]), *volumes],
        "nodeSelector": c.node_selector or None,
        "tolerations": to_dict(tolerations(spec)),
        "affinity": c.affinity or None,
        "imagePullSecrets": pull_secrets(spec),
        "serviceAccountName": c.service_account,
        "terminationGracePeriodSeconds": c.termination_grace_seconds,
        "securityContext": to_dict(pod_security),
    }
    metadata = {"labels": pod_labels(spec), **({"annotations": dict(c.annotations)} if c.annotations else {})}
    patch = {"metadata": metadata, "spec": {k: v for k, v in pod.items() if v is not None}}
    if c.pod_patch:
        patch = strategic_merge(patch, c.pod_patch)
        check_pod_template(patch, "cluster.pod_patch")
        check_peer_labels(patch, spec)
        refused = _unpatchable(patch)
        if refused:
            raise RenderError(f"cluster.pod_patch: {', '.join(refused)} cannot be set through a TrainJob's runtimePatches "
                              "(Trainer v2.3): set it in the ClusterTrainingRuntime (cluster.training_runtime), use "
                              "cluster.extra_resources for resources, or use backend pytorchjob")
    return patch


def build_trainjob(spec: RunSpec) -> dict[str, Any]:
    """The TrainJob that runs `spec` (pretrain or eval): numNodes pods of the runtime, each one torchrun."""
    c, r = spec.cluster, spec.runtime
    check_affinity(spec)
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
