"""What every rendered object shares, whichever backend: labels, the pod's command, security, environment and
/dev/shm, and the serialisation to the API server's dicts and to YAML. Nothing here imports torch."""

from __future__ import annotations

from typing import Any

import yaml
from kubernetes import client as k8s

from barlow import __version__
from barlow.spec import RENDERED_BY_ENV, SPEC_ENV, RunSpec, dump_spec

# torchrun with the worker's exit code passed through (plain torchrun exits 1 for every failure, see barlow/torchrun.py).
COMMAND = ["python", "-m", "barlow.torchrun", "-m", "barlow.entrypoint"]
SHUTDOWN_MARGIN_S = 10  # torchrun must give up on its workers before the kubelet's SIGKILL ends the pod
RUN_AS = 1000  # uid and gid of every pod's processes: the user both images create (docker/Dockerfile*)
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # the keys of k8s/base/s3-secret.template.yaml

LABEL_RUN = "barlow.dev/run"
LABEL_KIND = "barlow.dev/kind"
LABEL_HASH = "barlow.dev/spec-hash"
ANNOTATION_OUTPUT = "barlow.dev/output-url"
ANNOTATION_AFTER = "barlow.dev/after"
MANAGED_BY = {"app.kubernetes.io/managed-by": "barlow"}
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY = "kueue.x-k8s.io/priority-class"


class RenderError(ValueError):
    """A spec that cannot be rendered for a cluster (one line, naming the field)."""


def job_name(spec: RunSpec) -> str:
    """The job's name: the run name, already a DNS-1035 label of at most 50 characters
    (so `<name>-worker-1023` still fits the 63 characters of a pod name)."""
    return spec.name


def image(spec: RunSpec) -> str:
    """The training image; there is no default, because no registry is everyone's."""
    if not spec.cluster.image:
        raise RenderError(f"cluster.image is not set: build and push the training image (make image "
                          f"IMAGE=<registry>/barlow:{__version__}, then push it) and set cluster.image in the spec")
    return spec.cluster.image


def cli_image(spec: RunSpec) -> str:
    """The follow-up's image: cluster.cli_image, else the training image's repository + `-cli`, same tag (what
    `make image` tags the pair; a digest names one image's content, so a pinned image gets barlow's version)."""
    if spec.cluster.cli_image:
        return spec.cluster.cli_image
    ref, _, digest = image(spec).partition("@")
    repo, tag = ref.rsplit(":", 1) if ":" in ref.rsplit("/", 1)[-1] else (ref, None)  # a registry's :port is no tag
    tag = tag or (__version__ if digest else None)
    return f"{repo}-cli" + (f":{tag}" if tag else "")


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


def job_labels(spec: RunSpec) -> dict[str, str]:
    """The job object's labels: barlow's, plus Kueue's queue and priority where the spec names them."""
    c = spec.cluster
    kueue = {KUEUE_QUEUE: c.queue, KUEUE_PRIORITY: c.workload_priority_class}
    return {**labels(spec), **{k: v for k, v in kueue.items() if v}}


def security() -> tuple[k8s.V1PodSecurityContext, k8s.V1SecurityContext]:
    """The pod's and each container's security context: the Pod Security "restricted" profile (barlow needs no
    privilege), with the ids set here so that an image declaring another user (or root) cannot change them."""
    pod = k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=RUN_AS, run_as_group=RUN_AS,
                                   seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))
    container = k8s.V1SecurityContext(allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"]))
    return pod, container


def quantities(spec: RunSpec) -> dict[str, str]:
    """Requests and limits of one pod (equal: Guaranteed QoS, the last class the kubelet evicts)."""
    c = spec.cluster
    return {"cpu": c.cpu, "memory": c.memory, **({"nvidia.com/gpu": str(c.gpus_per_node)} if c.gpus_per_node else {})}


def training_env(spec: RunSpec) -> list[k8s.V1EnvVar]:
    """What the training container needs besides the operator's variables: the spec, and torchrun's shutdown time."""
    c = spec.cluster
    return [
        k8s.V1EnvVar(name=SPEC_ENV, value=dump_spec(spec)),
        k8s.V1EnvVar(name=RENDERED_BY_ENV, value=__version__),
        k8s.V1EnvVar(name="TORCH_ELASTIC_SHUTDOWN_TIMEOUT", value=str(c.termination_grace_seconds - SHUTDOWN_MARGIN_S)),
    ]


def tolerations(spec: RunSpec) -> list[k8s.V1Toleration] | None:
    attr = {v: k for k, v in k8s.V1Toleration.attribute_map.items()}  # Kubernetes field name -> model argument
    return [k8s.V1Toleration(**{attr[k]: v for k, v in t.items()}) for t in spec.cluster.tolerations] or None


def shm(spec: RunSpec) -> tuple[k8s.V1Volume, k8s.V1VolumeMount]:
    # Data-loader workers pass batches through /dev/shm; the container runtime's default is 64 MiB.
    volume = k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=spec.cluster.shm_size))
    return volume, k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")


def to_dict(obj: Any) -> Any:
    """A model (or a plain structure holding models) as the plain data the API server receives."""
    return k8s.ApiClient().sanitize_for_serialization(obj)


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so the embedded spec reads as YAML inside the manifest."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """Documents as one YAML stream for `kubectl apply -f -`."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, explicit_start=True)
