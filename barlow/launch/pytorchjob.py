"""The `pytorchjob` backend: a run spec as a Kubeflow `PyTorchJob` (training operator v1, kubeflow.org/v1).

Objects are built from the kubeflow-training SDK's models and kubernetes `V1*` models and serialised by the
client's own `sanitize_for_serialization`. Nothing here imports torch: rendering needs no GPU stack.
"""

from __future__ import annotations

from typing import Any

from kubeflow.training.models import (
    KubeflowOrgV1PyTorchJob,
    KubeflowOrgV1PyTorchJobSpec,
    KubeflowOrgV1ReplicaSpec,
    KubeflowOrgV1RunPolicy,
    KubeflowOrgV1SchedulingPolicy,
)
from kubernetes import client as k8s

from barlow.launch.backend import Backend, condition_phase, counts, register
from barlow.launch.manifest import (
    ANNOTATION_OUTPUT,
    COMMAND,
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

CONTAINER = "pytorch"  # the operator finds the training container, and its port, by this name
PORT_NAME, PORT = "pytorchjob-port", 23456  # the operator's defaults; it sets PET_MASTER_PORT from this port
# The pod's schedulerName for each gang scheduler: the operator (--gang-scheduler-name) must name the same one,
# else it leaves the pods alone and records a warning event instead of creating a PodGroup.
GANG_SCHEDULERS = {"volcano": "volcano", "scheduler-plugins": "scheduler-plugins-scheduler"}
# Labels the training operator puts on the pods it creates (`barlow logs` selects on them).
OPERATOR_JOB_NAME = "training.kubeflow.org/job-name"
OPERATOR_REPLICA_TYPE = "training.kubeflow.org/replica-type"
OPERATOR_REPLICA_INDEX = "training.kubeflow.org/replica-index"
# What the spec's unset pytorchjob-only fields render as (the operator's and Kubernetes' own defaults).
PULL_POLICY, BACKOFF_LIMIT, CLEAN_POD_POLICY = "IfNotPresent", 3, "None"


def _env_from(spec: RunSpec) -> list[k8s.V1EnvFromSource] | None:
    # Credentials reach the pod only by reference to a Secret; the spec never holds them.
    if not spec.cluster.s3_secret:
        return None
    return [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=spec.cluster.s3_secret))]


def _pod_template(spec: RunSpec) -> dict[str, Any]:
    """The pod template of every replica, with cluster.pod_patch applied and the result checked."""
    c = spec.cluster
    check_affinity(spec)
    pod_security, container_security = security()
    volume, mount = shm(spec)
    volumes, mounts = user_volumes(spec)
    container = k8s.V1Container(
        name=CONTAINER,
        image=image(spec),
        image_pull_policy=c.image_pull_policy or PULL_POLICY,
        command=COMMAND,
        env=[*training_env(spec), *user_env(spec)],
        env_from=_env_from(spec),
        ports=[k8s.V1ContainerPort(name=PORT_NAME, container_port=PORT, protocol="TCP")],
        resources=k8s.V1ResourceRequirements(requests=quantities(spec), limits=quantities(spec)),
        volume_mounts=[mount, *mounts],
        security_context=container_security,
    )
    template = to_dict(k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels=pod_labels(spec), annotations={
            **c.annotations, "kubectl.kubernetes.io/default-container": CONTAINER}),
        spec=k8s.V1PodSpec(
            containers=[container],
            volumes=[volume, *volumes],
            node_selector=c.node_selector or None,
            tolerations=tolerations(spec),
            affinity=c.affinity or None,
            image_pull_secrets=pull_secrets(spec),
            priority_class_name=c.priority_class,
            scheduler_name=GANG_SCHEDULERS.get(c.gang),
            service_account_name=c.service_account,
            automount_service_account_token=False,  # training pods never call the API server
            termination_grace_period_seconds=c.termination_grace_seconds,
            security_context=pod_security,
        ),
    ))
    if c.pod_patch:
        template = strategic_merge(template, c.pod_patch)
        check_pod_template(template, "cluster.pod_patch")
        check_peer_labels(template, spec)
    return template


def build_pytorchjob(spec: RunSpec) -> KubeflowOrgV1PyTorchJob:
    """The PyTorchJob that runs `spec` (pretrain or eval): a Master and nodes − 1 Workers, each one torchrun."""
    c, nodes = spec.cluster, spec.runtime.nodes
    replica = dict(restart_policy="ExitCode", template=_pod_template(spec))  # ≥128 retried, 1–127 permanent
    replicas = {"Master": KubeflowOrgV1ReplicaSpec(replicas=1, **replica)}
    if nodes > 1:
        replicas["Worker"] = KubeflowOrgV1ReplicaSpec(replicas=nodes - 1, **replica)
    gang = None
    if c.gang != "none":  # all pods or none: a half-placed job would hold its GPUs while waiting for the rest
        gang = KubeflowOrgV1SchedulingPolicy(min_available=nodes, priority_class=c.priority_class)
    return KubeflowOrgV1PyTorchJob(
        api_version=BACKEND.api_version,
        kind=BACKEND.kind,
        metadata=k8s.V1ObjectMeta(
            name=job_name(spec), namespace=c.namespace, labels=job_labels(spec),
            annotations={ANNOTATION_OUTPUT: spec.output.url},
        ),
        spec=KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(spec.runtime.nproc_per_node),  # the CRD types it as a string; never "auto"
            pytorch_replica_specs=replicas,
            run_policy=KubeflowOrgV1RunPolicy(
                backoff_limit=BACKOFF_LIMIT if c.backoff_limit is None else c.backoff_limit,
                ttl_seconds_after_finished=c.ttl_seconds_after_finished,
                active_deadline_seconds=c.active_deadline_seconds,
                clean_pod_policy=c.clean_pod_policy or CLEAN_POD_POLICY,
                scheduling_policy=gang,
            ),
        ),
    )


def render(spec: RunSpec) -> dict[str, Any]:
    return to_dict(build_pytorchjob(spec))


def pod_selector(name: str, replica: str) -> str:
    """master, or worker-N (N from 0: node rank N + 1)."""
    if replica == "master":
        rtype, index = "master", 0
    else:
        kind, _, number = replica.partition("-")
        if kind != "worker" or not number.isdigit():
            raise RenderError(f"--replica must be master or worker-N (N from 0), not '{replica}'")
        rtype, index = "worker", int(number)
    return f"{OPERATOR_JOB_NAME}={name},{OPERATOR_REPLICA_TYPE}={rtype},{OPERATOR_REPLICA_INDEX}={index}"


def phase(obj: dict[str, Any]) -> tuple[str, str]:
    """The operator's latest condition (Created, Running, Restarting, Succeeded, Failed), or Queued while suspended."""
    return condition_phase(obj, SUCCEEDED) or ("Pending", "")


def replicas(status: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Counts per replica type (Master, Worker)."""
    return {k: counts(v) for k, v in (status.get("replicaStatuses") or {}).items()}


SUCCEEDED = "Succeeded"
BACKEND = register(Backend(
    name="pytorchjob", group="kubeflow.org", version="v1", plural="pytorchjobs", kind="PyTorchJob", container=CONTAINER,
    build=render, pod_selector=pod_selector, phase=phase, replicas=replicas, succeeded=SUCCEEDED,
    installs="the Kubeflow training operator v1"))
