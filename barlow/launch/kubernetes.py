"""Render a run spec as a Kubeflow `PyTorchJob` (training operator v1), and the pipeline's follow-up `Job`.

Objects are built from the kubeflow-training SDK's models and kubernetes `V1*` models and serialised by the
client's own `sanitize_for_serialization`. Nothing here imports torch: rendering needs no GPU stack.
"""

from __future__ import annotations

from typing import Any

import yaml
from kubeflow.training.models import (
    KubeflowOrgV1PyTorchJob,
    KubeflowOrgV1PyTorchJobSpec,
    KubeflowOrgV1ReplicaSpec,
    KubeflowOrgV1RunPolicy,
)
from kubernetes import client as k8s
from pydantic import ValidationError

from barlow.spec import SPEC_ENV, EvalRunSpec, PretrainSpec, RunSpec, SpecError, dump_spec

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
API_VERSION = f"{GROUP}/{VERSION}"
CONTAINER = "pytorch"  # the operator finds the training container, and its port, by this name
PORT_NAME, PORT = "pytorchjob-port", 23456  # the operator's defaults; it sets PET_MASTER_PORT from this port
# torchrun with the worker's exit code passed through (plain torchrun exits 1 for every failure, see barlow/torchrun.py).
COMMAND = ["python", "-m", "barlow.torchrun", "-m", "barlow.entrypoint"]
SHUTDOWN_MARGIN_S = 10  # torchrun must give up on its workers before the kubelet's SIGKILL ends the pod

LABEL_RUN = "barlow.dev/run"
LABEL_KIND = "barlow.dev/kind"
LABEL_HASH = "barlow.dev/spec-hash"
ANNOTATION_OUTPUT = "barlow.dev/output-url"
ANNOTATION_AFTER = "barlow.dev/after"
MANAGED_BY = {"app.kubernetes.io/managed-by": "barlow"}
# Labels the training operator puts on the pods it creates (`barlow logs` selects on them).
OPERATOR_JOB_NAME = "training.kubeflow.org/job-name"
OPERATOR_REPLICA_TYPE = "training.kubeflow.org/replica-type"
OPERATOR_REPLICA_INDEX = "training.kubeflow.org/replica-index"


def job_name(spec: RunSpec) -> str:
    """The PyTorchJob's name: the run name, already a DNS-1035 label of at most 50 characters
    (so `<name>-worker-1023` still fits the 63 characters of a pod name)."""
    return spec.name


def follow_up_name(spec: PretrainSpec) -> str:
    """The name of the Job that starts the eval after `spec`'s pretraining succeeds."""
    return f"{spec.name}-follow-up"


def eval_of(spec: PretrainSpec) -> EvalRunSpec:
    """The follow-up eval of a pretrain spec; raises SpecError (checked before anything is submitted)."""
    try:
        return spec.eval_spec()
    except ValidationError as e:
        raise SpecError.from_validation(e, "the follow-up eval") from None


def labels(spec: RunSpec, component: str | None = None) -> dict[str, str]:
    """Labels of everything rendered for `spec`: the recommended `app.kubernetes.io/*` set, run and spec hash."""
    return {
        "app.kubernetes.io/name": "barlow",
        "app.kubernetes.io/instance": job_name(spec),
        "app.kubernetes.io/component": component or spec.kind,
        **MANAGED_BY,
        LABEL_RUN: spec.name,
        LABEL_KIND: spec.kind,
        LABEL_HASH: spec.spec_hash(),
    }


def _security() -> tuple[k8s.V1PodSecurityContext, k8s.V1SecurityContext]:
    # The Pod Security "restricted" profile: the training needs no privileges (the image's user is uid 1000).
    pod = k8s.V1PodSecurityContext(run_as_non_root=True, seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))
    container = k8s.V1SecurityContext(allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"]))
    return pod, container


def _env_from(spec: RunSpec) -> list[k8s.V1EnvFromSource] | None:
    # Credentials reach the pod only by reference to a Secret; the spec never holds them.
    if not spec.cluster.s3_secret:
        return None
    return [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=spec.cluster.s3_secret))]


def _tolerations(spec: RunSpec) -> list[k8s.V1Toleration] | None:
    attr = {v: k for k, v in k8s.V1Toleration.attribute_map.items()}  # Kubernetes field name -> model argument
    return [k8s.V1Toleration(**{attr[k]: v for k, v in t.items()}) for t in spec.cluster.tolerations] or None


def _pod_template(spec: RunSpec) -> k8s.V1PodTemplateSpec:
    c = spec.cluster
    quantities = {"cpu": c.cpu, "memory": c.memory}
    if c.gpus_per_node:
        quantities["nvidia.com/gpu"] = str(c.gpus_per_node)
    pod_security, container_security = _security()
    container = k8s.V1Container(
        name=CONTAINER,
        image=c.image,
        image_pull_policy=c.image_pull_policy,
        command=COMMAND,
        env=[
            k8s.V1EnvVar(name=SPEC_ENV, value=dump_spec(spec)),
            k8s.V1EnvVar(name="TORCH_ELASTIC_SHUTDOWN_TIMEOUT", value=str(c.termination_grace_seconds - SHUTDOWN_MARGIN_S)),
        ],
        env_from=_env_from(spec),
        ports=[k8s.V1ContainerPort(name=PORT_NAME, container_port=PORT, protocol="TCP")],
        # Requests equal limits: Guaranteed QoS, the last class the kubelet evicts under memory pressure.
        resources=k8s.V1ResourceRequirements(requests=dict(quantities), limits=dict(quantities)),
        volume_mounts=[k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
        security_context=container_security,
    )
    return k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels=labels(spec), annotations={"kubectl.kubernetes.io/default-container": CONTAINER}),
        spec=k8s.V1PodSpec(
            containers=[container],
            # Data-loader workers pass batches through /dev/shm; the container runtime's default is 64 MiB.
            volumes=[k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=c.shm_size))],
            node_selector=c.node_selector or None,
            tolerations=_tolerations(spec),
            priority_class_name=c.priority_class,
            service_account_name=c.service_account,
            automount_service_account_token=False,  # training pods never call the API server
            termination_grace_period_seconds=c.termination_grace_seconds,
            security_context=pod_security,
        ),
    )


def build_pytorchjob(spec: RunSpec) -> KubeflowOrgV1PyTorchJob:
    """The PyTorchJob that runs `spec` (pretrain or eval): a Master and nodes − 1 Workers, each one torchrun."""
    c, nodes = spec.cluster, spec.runtime.nodes
    replica = dict(restart_policy="ExitCode", template=_pod_template(spec))  # ≥128 retried, 1–127 permanent
    replicas = {"Master": KubeflowOrgV1ReplicaSpec(replicas=1, **replica)}
    if nodes > 1:
        replicas["Worker"] = KubeflowOrgV1ReplicaSpec(replicas=nodes - 1, **replica)
    return KubeflowOrgV1PyTorchJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=k8s.V1ObjectMeta(
            name=job_name(spec), namespace=c.namespace, labels=labels(spec),
            annotations={ANNOTATION_OUTPUT: spec.output.url},
        ),
        spec=KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(spec.runtime.nproc_per_node),  # the CRD types it as a string; never "auto"
            pytorch_replica_specs=replicas,
            run_policy=KubeflowOrgV1RunPolicy(
                backoff_limit=c.backoff_limit,
                ttl_seconds_after_finished=c.ttl_seconds_after_finished,
                active_deadline_seconds=c.active_deadline_seconds,
                clean_pod_policy=c.clean_pod_policy,
            ),
        ),
    )


def build_follow_up(spec: PretrainSpec, poll_seconds: int = 30) -> k8s.V1Job:
    """A small CPU Job that waits for `spec`'s PyTorchJob and, once it succeeds, submits the eval PyTorchJob.

    It runs `barlow submit eval --after <pretrain job>` with the eval spec in BARLOW_SPEC, under the namespace's
    `barlow` service account (k8s/base grants it get/create on pytorchjobs).
    """
    ev, c = eval_of(spec), spec.cluster
    pod_security, container_security = _security()
    container = k8s.V1Container(
        name="follow-up",
        image=c.image,
        image_pull_policy=c.image_pull_policy,
        command=["barlow", "submit", "eval", "--after", job_name(spec), "--poll", str(poll_seconds)],
        env=[k8s.V1EnvVar(name=SPEC_ENV, value=dump_spec(ev))],
        resources=k8s.V1ResourceRequirements(requests={"cpu": "50m", "memory": "256Mi"}, limits={"memory": "512Mi"}),
        security_context=container_security,
    )
    return k8s.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=k8s.V1ObjectMeta(
            name=follow_up_name(spec), namespace=c.namespace, labels=labels(ev, component="follow-up"),
            annotations={ANNOTATION_AFTER: job_name(spec), ANNOTATION_OUTPUT: ev.output.url},
        ),
        spec=k8s.V1JobSpec(
            backoff_limit=6,  # restarts after node loss or API hiccups; the submit it ends with is idempotent
            ttl_seconds_after_finished=c.ttl_seconds_after_finished,
            # Pretrain failed (1) or the eval spec is invalid (2): retrying cannot help.
            pod_failure_policy=k8s.V1PodFailurePolicy(rules=[
                k8s.V1PodFailurePolicyRule(action="FailJob", on_exit_codes=k8s.V1PodFailurePolicyOnExitCodesRequirement(
                    container_name="follow-up", operator="In", values=[1, 2])),
                k8s.V1PodFailurePolicyRule(action="Ignore", on_pod_conditions=[
                    k8s.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")]),
            ]),
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=labels(ev, component="follow-up")),
                spec=k8s.V1PodSpec(
                    containers=[container],
                    restart_policy="Never",  # podFailurePolicy requires it
                    service_account_name=c.service_account,
                    automount_service_account_token=True,  # it calls the API; k8s/base turns the default off
                    priority_class_name=c.priority_class,
                    security_context=pod_security,
                ),
            ),
        ),
    )


def to_dict(obj: Any) -> dict[str, Any]:
    """A model as the plain dict the API server receives."""
    return k8s.ApiClient().sanitize_for_serialization(obj)


def render(spec: PretrainSpec | EvalRunSpec, what: str | None = None) -> list[dict[str, Any]]:
    """The manifests for `barlow render WHAT`: pretrain or eval (one PyTorchJob), pipeline (PyTorchJob + follow-up Job).

    `what` defaults to the spec's kind; `eval` of a pretrain spec renders the eval of its checkpoint.
    """
    what = what or spec.kind
    if what == "pipeline":
        if not isinstance(spec, PretrainSpec):
            raise ValueError("a pipeline needs a pretrain spec (kind: pretrain)")
        return [to_dict(build_pytorchjob(spec)), to_dict(build_follow_up(spec))]
    if what == "eval" and isinstance(spec, PretrainSpec):
        return [to_dict(build_pytorchjob(eval_of(spec)))]
    if what != spec.kind:
        raise ValueError(f"this is a {spec.kind} spec: use `{spec.kind}` (or `pipeline`), not `{what}`")
    return [to_dict(build_pytorchjob(spec))]


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so the embedded spec reads as YAML inside the manifest."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """Documents as one YAML stream for `kubectl apply -f -`."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, explicit_start=True)
