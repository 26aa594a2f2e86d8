"""What every rendered object shares, whichever backend: labels, the pod's command, security, environment and
/dev/shm, and the serialisation to the API server's dicts and to YAML. Nothing here imports torch."""

from __future__ import annotations

from typing import Any

import yaml
from kubernetes import client as k8s

from barlow import __version__
from barlow.spec import POD_NAMESPACE_ENV, RENDERED_BY_ENV, SECRET_LIKE, SPEC_ENV, RunSpec, dump_spec

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


# The labels that pick exactly one training job's pods (its NetworkPolicy selects on them). The component tells the
# eval's pods from the pipeline's follow-up pod, which carries the eval's instance.
PEER_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")


def peer_labels(spec: RunSpec) -> dict[str, str]:
    """The training pods' labels that select this job's pods and no other pod."""
    own = labels(spec)
    return {k: own[k] for k in PEER_LABELS}


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
    return {"cpu": c.cpu, "memory": c.memory, **({"nvidia.com/gpu": str(c.gpus_per_node)} if c.gpus_per_node else {}),
            **c.extra_resources}


def training_env(spec: RunSpec) -> list[k8s.V1EnvVar]:
    """What the training container needs besides the operator's variables: the spec, and torchrun's shutdown time."""
    c = spec.cluster
    return [
        k8s.V1EnvVar(name=SPEC_ENV, value=dump_spec(spec)),
        k8s.V1EnvVar(name=RENDERED_BY_ENV, value=__version__),
        # the job's identity (namespace/name) holds the output's lease, so the job's restarted pods take it over
        k8s.V1EnvVar(name=POD_NAMESPACE_ENV, value_from=k8s.V1EnvVarSource(
            field_ref=k8s.V1ObjectFieldSelector(field_path="metadata.namespace"))),
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


def user_env(spec: RunSpec) -> list[dict[str, Any]]:
    """cluster.env in Kubernetes form: a value, or valueFrom a Secret's or ConfigMap's key."""
    out = []
    for name, value in spec.cluster.env.items():
        if isinstance(value, str):
            out.append({"name": name, "value": value})
        elif value.secret:
            out.append({"name": name, "valueFrom": {"secretKeyRef": {"name": value.secret, "key": value.key}}})
        else:
            out.append({"name": name, "valueFrom": {"configMapKeyRef": {"name": value.config_map, "key": value.key}}})
    return out


def user_volumes(spec: RunSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, the training container's mounts) of cluster.volumes, in Kubernetes form."""
    volumes, mounts = [], []
    for v in spec.cluster.volumes:
        read_only = {"readOnly": True} if v.read_only else {}
        if v.pvc:
            source = {"persistentVolumeClaim": {"claimName": v.pvc, **read_only}}
        elif v.nfs:
            source = {"nfs": {"server": v.nfs.server, "path": v.nfs.path, **read_only}}
        elif v.config_map:
            source = {"configMap": {"name": v.config_map}}
        else:
            source = {"emptyDir": {"sizeLimit": v.empty_dir.size_limit} if v.empty_dir.size_limit else {}}
        volumes.append({"name": v.name, **source})
        mounts.append({"name": v.name, "mountPath": v.mount_path, **read_only})
    return volumes, mounts


def pull_secrets(spec: RunSpec) -> list[dict[str, str]] | None:
    return [{"name": n} for n in spec.cluster.image_pull_secrets] or None


def pod_labels(spec: RunSpec) -> dict[str, str]:
    """The training pods' labels: the spec's cluster.pod_labels, then barlow's (which they may not override)."""
    return {**spec.cluster.pod_labels, **labels(spec)}


# Strategic merge: the lists of a pod template that merge item by item, and the key that matches items (Kubernetes'
# x-kubernetes-patch-merge-key; tests/launch/test_launch_pod.py holds this table to the Pod schema). Other lists are
# replaced whole, as Kubernetes does.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "volumes": "name", "env": "name",
    "imagePullSecrets": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath", "ports": "containerPort",
    "hostAliases": "ip", "resourceClaims": "name", "schedulingGates": "name", "topologySpreadConstraints": "topologyKey",
    "evictionResponders": "name",
}
PATCH = "$patch"  # a strategic-merge directive: `$patch: delete` removes a list item or a map, `replace` replaces it


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """`patch` applied to `base` as a Kubernetes strategic-merge patch of a pod template: maps merge (a null value
    deletes the key), lists in MERGE_KEYS merge by their key, other lists and scalars are replaced."""
    if isinstance(patch, dict) and isinstance(base, dict):
        if patch.get(PATCH) == "replace":
            return {k: v for k, v in patch.items() if k != PATCH}
        out = dict(base)
        for key, value in patch.items():
            if key == PATCH:
                continue
            if value is None:
                out.pop(key, None)
            elif isinstance(value, dict) and value.get(PATCH) == "delete":
                out.pop(key, None)
            else:
                out[key] = strategic_merge(base.get(key), value, key)
        return out
    if isinstance(patch, list) and isinstance(base, list) and field in MERGE_KEYS:
        key, out = MERGE_KEYS[field], list(base)
        for item in patch:
            match = next((i for i, b in enumerate(out) if isinstance(item, dict) and isinstance(b, dict)
                          and key in item and b.get(key) == item[key]), None)
            if isinstance(item, dict) and item.get(PATCH) == "delete":
                if match is not None:
                    del out[match]
            elif match is not None:
                out[match] = strategic_merge(out[match], item, "")
            else:
                out.append(strategic_merge({}, item, "") if isinstance(item, dict) else item)
        return out
    if isinstance(patch, dict):
        return strategic_merge({}, patch, field)
    return patch


def schema_problems(data: Any, model: str, path: str) -> list[str]:
    """Where `data` (Kubernetes form) does not fit the kubernetes client's model `model` (e.g. V1PodTemplateSpec):
    unknown fields and wrong types, one `path: message` each. Required fields are left to the API server."""
    if data is None or model == "object":
        return []
    if model.startswith("list["):
        if not isinstance(data, list):
            return [f"{path}: must be a list"]
        return [p for i, item in enumerate(data) for p in schema_problems(item, model[5:-1], f"{path}[{i}]")]
    if model.startswith("dict("):
        if not isinstance(data, dict):
            return [f"{path}: must be a mapping"]
        inner = model[5:-1].split(", ", 1)[1]
        return [p for k, v in data.items() for p in schema_problems(v, inner, f"{path}.{k}")]
    primitive = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str, "date": str}.get(model)
    if primitive is not None:
        ok = isinstance(data, primitive) and not (model in ("int", "float") and isinstance(data, bool))
        return [] if ok else [f"{path}: must be {'a string' if primitive is str else 'a ' + model}"]
    cls = getattr(k8s, model)
    if not isinstance(data, dict):
        return [f"{path}: must be a mapping ({model[2:]})"]
    fields = {cls.attribute_map[a]: t for a, t in cls.openapi_types.items()}
    problems = []
    for key, value in data.items():
        if key == PATCH:
            continue
        if key not in fields:
            close = [f for f in fields if f.lower() == key.lower()]
            problems.append(f"{path}.{key}: unknown field" + (f" (did you mean '{close[0]}'?)" if close else ""))
        else:
            problems += schema_problems(value, fields[key], f"{path}.{key}")
    return problems


def check_pod_template(template: dict[str, Any], field: str) -> None:
    """Raise RenderError (one line, the first problem) where the pod template does not fit the Pod schema, or gives a
    credential-like variable a plain value (credentials reach a pod only from a Secret)."""
    problems = schema_problems(template, "V1PodTemplateSpec", field)
    for kind in ("containers", "initContainers"):
        for c in (template.get("spec") or {}).get(kind) or []:
            problems += [f"{field}: {kind}[{c.get('name', '?')}].env {e['name']} looks like a credential: take it from "
                         "a Secret (valueFrom.secretKeyRef), never as a value in the spec"
                         for e in c.get("env") or [] if isinstance(e, dict) and "value" in e
                         and SECRET_LIKE.fullmatch(str(e.get("name", "")))]
    if problems:
        raise RenderError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def check_peer_labels(template: dict[str, Any], spec: RunSpec) -> None:
    """Raise RenderError where cluster.pod_patch changed a label that selects the job's pods (its NetworkPolicy would
    then admit nothing to them)."""
    have = (template.get("metadata") or {}).get("labels") or {}
    for key, value in peer_labels(spec).items():
        if have.get(key) != value:
            raise RenderError(f"cluster.pod_patch: metadata.labels.{key}: barlow sets it to '{value}' (the job's "
                              "NetworkPolicy admits traffic only between pods labelled so): leave it out of the patch")


def check_pod_fields(spec: RunSpec) -> None:
    """Hold cluster.affinity and cluster.pod_patch to the Pod schema, as rendering does (for `barlow validate`)."""
    if spec.cluster.affinity:
        check_affinity(spec)
    if spec.cluster.pod_patch:
        check_pod_template(strategic_merge({}, spec.cluster.pod_patch), "cluster.pod_patch")


def check_affinity(spec: RunSpec) -> None:
    """Raise RenderError (one line) where cluster.affinity does not fit the Kubernetes Affinity schema."""
    problems = schema_problems(spec.cluster.affinity, "V1Affinity", "cluster.affinity")
    if problems:
        raise RenderError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
