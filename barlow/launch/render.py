"""The manifests of `barlow render`: a spec's training job, through its backend (PyTorchJob or TrainJob), the
NetworkPolicy that lets that job's pods reach each other, and the pipeline's follow-up `Job` that submits the eval once
pretraining has succeeded. This module renders; `cluster` talks to the API. Nothing here imports torch."""

from __future__ import annotations

from typing import Any

from kubernetes import client as k8s

from barlow.errors import FOLLOW_UP_PERMANENT
from barlow.launch import backend
from barlow.launch.checks import check_cluster_run
from barlow.launch.manifest import (
    ANNOTATION_AFTER,
    ANNOTATION_OUTPUT,
    RenderError,
    cli_image,
    job_name,
    labels,
    peer_labels,
    pull_secrets,
    security,
    to_dict,
    to_yaml,
)
from barlow.spec import SPEC_ENV, EvalRunSpec, PretrainSpec, RunSpec, dump_spec, follow_up_eval, stage_runs

__all__ = ["RenderError", "build_follow_up", "build_network_policy", "follow_up_name", "network_policy_name", "render",
           "to_yaml"]


def follow_up_name(spec: PretrainSpec) -> str:
    """The name of the Job that starts the eval after `spec`'s pretraining succeeds."""
    return f"{spec.name}-follow-up"


def build_follow_up(spec: PretrainSpec, poll_seconds: int = 30) -> k8s.V1Job:
    """A small CPU Job that waits for `spec`'s job (PyTorchJob or TrainJob) and, once it succeeds, submits the eval.

    It runs `barlow submit eval --after <pretrain job>` from the CLI image (`cluster.cli_image`) with the eval spec in
    BARLOW_SPEC, under the namespace's `barlow` service account (k8s/base grants it get/create on pytorchjobs and
    trainjobs)."""
    ev, c = follow_up_eval(spec), spec.cluster
    pod_security, container_security = security()
    container = k8s.V1Container(
        name="follow-up",
        image=cli_image(spec),  # barlow without torch: the pod only polls the API and submits
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
                    container_name="follow-up", operator="In", values=list(FOLLOW_UP_PERMANENT))),
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
                    image_pull_secrets=pull_secrets(spec),  # the CLI image comes from the same private registry
                    security_context=pod_security,
                ),
            ),
        ),
    )


def network_policy_name(spec: RunSpec) -> str:
    """The name of the NetworkPolicy that admits `spec`'s job's pods to each other."""
    return f"{job_name(spec)}-peers"


def build_network_policy(spec: RunSpec) -> k8s.V1NetworkPolicy:
    """Ingress to the job's pods from the same job's pods only: torchrun's rendezvous, NCCL and gloo between ranks
    (any port: NCCL picks its own). k8s/base's default-deny isolates every barlow pod; this is what opens a job to
    itself. Egress is not restricted."""
    peers = k8s.V1LabelSelector(match_labels=peer_labels(spec))
    return k8s.V1NetworkPolicy(
        api_version="networking.k8s.io/v1",
        kind="NetworkPolicy",
        metadata=k8s.V1ObjectMeta(name=network_policy_name(spec), namespace=spec.cluster.namespace, labels=labels(spec)),
        spec=k8s.V1NetworkPolicySpec(
            pod_selector=peers,
            policy_types=["Ingress"],
            ingress=[k8s.V1NetworkPolicyIngressRule(_from=[k8s.V1NetworkPolicyPeer(pod_selector=peers)])],
        ),
    )


def render(spec: PretrainSpec | EvalRunSpec, what: str | None = None) -> list[dict[str, Any]]:
    """The manifests for `barlow render STAGE`: pretrain or eval (the job's NetworkPolicy, then one job of the spec's
    backend), pipeline (the pretrain job's NetworkPolicy and job, then the follow-up Job that submits the eval). The
    policy comes first, so that `kubectl apply -f -` creates it before any pod. `what` defaults to the spec's kind;
    `eval` of a pretrain spec renders the eval of its checkpoint. Raises SpecError or RenderError (one line) before
    rendering anything.
    Every cluster entry point (render, submit, the pipeline's follow-up) comes through here, so each run gets the
    cluster-only checks (launch/checks.py) that a local run does not.
    """
    runs = stage_runs(spec, what or spec.kind)
    for run in runs:
        check_cluster_run(run, "the follow-up eval" if run is not spec and run.kind == "eval" else None)
    run = runs[0]
    docs = [to_dict(build_network_policy(run)), backend.of(spec).build(run)]
    if len(runs) == 2:  # the pipeline: the eval job and its policy are created later, by the follow-up
        docs.append(to_dict(build_follow_up(spec)))
    return docs
