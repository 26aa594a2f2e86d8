"""cluster.*: how a run is placed on Kubernetes, in the pod's own vocabulary (names, labels, environment with key
references, volumes, resources), and the environment barlow itself sets on the training container."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from barlow.spec.base import QUANTITY, Quantity, Section, _quantity_text
from barlow.spec.plugins import BACKENDS

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # a run name: the Kubernetes job name derives from it
SPEC_ENV = "BARLOW_SPEC"  # the resolved spec's YAML travels to torchrun's processes (local and in pods) in this variable
MULTUS_NETWORKS = "k8s.v1.cni.cncf.io/networks"  # the pod annotation that attaches extra (RDMA) networks
RENDERED_BY_ENV = "BARLOW_RENDERED_BY"  # the barlow version that rendered a pod's spec (named on a version skew)
POD_NAMESPACE_ENV = "BARLOW_POD_NAMESPACE"  # a training pod's namespace (downward API): with the name, the job's identity

# A label or annotation key: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters.
QUALIFIED_NAME = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                            r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# Environment names that look like credentials: they may only come from a Secret, never as a value in the spec.
SECRET_LIKE = re.compile(r".*(SECRET|PASSWORD|PASSWD|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL).*", re.IGNORECASE)


def _k8s_name(v: str) -> str:
    if not K8S_NAME.fullmatch(v) or len(v) > 253:
        raise ValueError(f"'{v}' is not a valid Kubernetes name (lowercase letters, digits, '-')")
    return v


class KeyRef(Section):
    """One key of a Secret or ConfigMap in the job's namespace."""

    key: str = Field(min_length=1, max_length=253, description="The key whose value becomes the variable's value.")
    secret: str | None = Field(None, description="Secret name (valueFrom.secretKeyRef).")
    config_map: str | None = Field(None, description="ConfigMap name (valueFrom.configMapKeyRef).")

    @field_validator("secret", "config_map")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else _k8s_name(v)

    @model_validator(mode="after")
    def _one_source(self) -> KeyRef:
        if (self.secret is None) == (self.config_map is None):
            raise ValueError("set one of secret or config_map (with key)")
        return self


class NFSSpec(Section):
    """An NFS export."""

    server: str = Field(min_length=1, description="NFS server host name or IP address.")
    path: str = Field(pattern=r"^/", description="Exported path on the server (absolute).")


class EmptyDirSpec(Section):
    """A scratch directory that lives as long as the pod (node disk)."""

    size_limit: str | None = Field(None, description="Largest size (Kubernetes quantity); unset: no limit.")

    @field_validator("size_limit", mode="before")
    @classmethod
    def _number_as_quantity(cls, v: Any) -> Any:
        return _quantity_text(v)

    @field_validator("size_limit")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is not None and not QUANTITY.fullmatch(v):
            raise ValueError(f"'{v}' is not a Kubernetes quantity (e.g. 100Gi)")
        return v


class VolumeSpec(Section):
    """A volume mounted into the training container: exactly one of pvc, nfs, config_map, empty_dir."""

    name: str = Field(description="Volume name (a DNS label, unique in the pod).")
    mount_path: str = Field(pattern=r"^/", description="Where the training container sees it (an absolute path).")
    read_only: bool = Field(False, description="Mount read-only.")
    pvc: str | None = Field(None, description="PersistentVolumeClaim name in the job's namespace.")
    nfs: NFSSpec | None = Field(None, description="An NFS export (server, path).")
    config_map: str | None = Field(None, description="ConfigMap name, its keys as files.")
    empty_dir: EmptyDirSpec | None = Field(None, description="Scratch space on the node for the pod's life.")

    @field_validator("name")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if not DNS_1123_LABEL.fullmatch(v):
            raise ValueError(f"'{v}' is not a DNS label (lowercase letters, digits, '-'; at most 63)")
        return v

    @field_validator("pvc", "config_map")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else _k8s_name(v)

    @model_validator(mode="after")
    def _one_source(self) -> VolumeSpec:
        sources = [f for f in ("pvc", "nfs", "config_map", "empty_dir") if getattr(self, f) is not None]
        if len(sources) != 1:
            raise ValueError(f"volume '{self.name}': set exactly one of pvc, nfs, config_map, empty_dir"
                             + (f" (got {', '.join(sources)})" if sources else ""))
        return self

    @property
    def source(self) -> str:
        return next(f for f in ("pvc", "nfs", "config_map", "empty_dir") if getattr(self, f) is not None)


# Names barlow sets on the training container; PET_* are the operators' (a TrainJob that sets one is rejected).
RESERVED_ENV = (SPEC_ENV, RENDERED_BY_ENV, POD_NAMESPACE_ENV, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
RESERVED_MOUNTS = {"dshm": "/dev/shm"}  # the memory-backed /dev/shm barlow mounts (cluster.shm_size)
BARLOW_LABEL_PREFIXES = ("barlow.dev/", "app.kubernetes.io/")  # barlow's own labels; a pod label may not override them


class ClusterSpec(Section):
    """How the run is placed on Kubernetes (ignored by local runs)."""

    backend: Literal[tuple(BACKENDS)] = Field(  # type: ignore[valid-type]
        "trainjob", description="trainjob: Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1 TrainJob; tested against "
                                "Trainer v2.3); pytorchjob: Kubeflow training operator v1 (kubeflow.org/v1 "
                                "PyTorchJob), in maintenance only, for clusters that still run it.")
    training_runtime: str = Field("torch-distributed", min_length=1, max_length=253,
                                  description="trainjob: the ClusterTrainingRuntime the TrainJob refers to.")
    image: str | None = Field(None, min_length=1, description="Container image with barlow installed, pushed to a "
                              "registry the cluster can pull from (`make image IMAGE=...`); needed to render or submit.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Kubernetes imagePullPolicy (pytorchjob; unset: IfNotPresent). A TrainJob's runtime decides it.")
    cli_image: str | None = Field(None, min_length=1, description="Image of the pipeline's follow-up pod: barlow without "
                                  "torch (`make image` builds it beside the training image). Unset: cluster.image's "
                                  "repository + '-cli' with its tag (<registry>/barlow:0.1.0 -> <registry>/barlow-cli:0.1.0; "
                                  "an image pinned by digest gets barlow's version as the tag).")
    namespace: str = Field("barlow", description="Namespace the job is created in.")
    gpus_per_node: int = Field(0, ge=0, le=64, description="nvidia.com/gpu per pod; when > 0 must equal runtime.nproc_per_node.")
    cpu: Quantity = Field("8", description="CPU request and limit per pod (Kubernetes quantity; a YAML number is fine).")
    memory: Quantity = Field("32Gi", description="Memory request and limit per pod (Kubernetes quantity).")
    shm_size: Quantity = Field("16Gi", description="Size of the memory-backed /dev/shm for data-loader workers.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations (Kubernetes form).")
    priority_class: str | None = Field(None, description="Pod priorityClassName (pytorchjob; also the gang's priority).")
    queue: str | None = Field(None, description="Kueue LocalQueue: adds the kueue.x-k8s.io/queue-name label, so "
                              "Kueue admits (unsuspends) the job when the queue has quota.")
    workload_priority_class: str | None = Field(
        None, description="Kueue WorkloadPriorityClass: the kueue.x-k8s.io/priority-class label (with cluster.queue).")
    gang: Literal["none", "volcano", "scheduler-plugins"] = Field(
        "none", description="pytorchjob: gang scheduling through runPolicy.schedulingPolicy (all pods or none); "
                            "the training operator must run with the same --gang-scheduler-name.")
    service_account: str = Field("barlow", description="Pod serviceAccountName.")
    s3_secret: str | None = Field("barlow-s3", description="Secret whose keys (AWS_ACCESS_KEY_ID, ...) become the pod's environment.")
    backoff_limit: int | None = Field(None, ge=0, le=1000, description="Retries of retryable failures (pytorchjob "
                                      "runPolicy; unset: 3). A TrainJob's runtime (its JobSet failure policy) decides it.")
    node_mtbf_hours: float = Field(
        5000.0, gt=0, le=1e7, description="Mean time between failures of one node, in hours (preemptions included): "
                                         "with the nodes, what `barlow plan`'s checkpoint interval (Young/Daly) uses.")
    max_restarts: int = Field(
        5, ge=0, le=1000, description="Retryable failures in a row without a new checkpoint before the pod's "
                                      "entrypoint gives up with a permanent exit code (bounds ExitCode restarts).")
    ttl_seconds_after_finished: int | None = Field(86400, ge=0, description="Delete the finished job after this many seconds.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail the job after this many seconds.")
    clean_pod_policy: Literal["None", "Running", "All"] | None = Field(
        None, description="Pods deleted when the job ends (pytorchjob; unset: None). A TrainJob's runtime decides it.")
    termination_grace_seconds: int = Field(
        120, ge=30, le=86400, description="Seconds a pod gets after SIGTERM (preemption) to write a checkpoint and exit.")
    cpu_only: bool = Field(False, description="A pretrain on pods without GPUs is meant (a demo or a CI cluster); "
                           "without it a cluster pretrain that requests no GPU is refused (it would take years).")
    env: dict[str, str | KeyRef] = Field(
        default_factory=dict, description="Environment of the training container: NAME: value, or NAME: {secret: S, "
        "key: K} / {config_map: C, key: K} (valueFrom); e.g. NCCL_IB_HCA: mlx5. Credentials only from a Secret.")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets for pulling cluster.image from "
                                          "a private registry (pod imagePullSecrets).")
    volumes: list[VolumeSpec] = Field(default_factory=list, description="Volumes mounted into the training container "
                                      "(PVC, NFS, ConfigMap or emptyDir), each with mount_path and read_only.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Pod annotations, e.g. Multus "
                                        "k8s.v1.cni.cncf.io/networks for RDMA networks.")
    pod_labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels (barlow's own "
                                       "barlow.dev/* and app.kubernetes.io/* labels cannot be overridden).")
    extra_resources: dict[str, str] = Field(
        default_factory=dict, description="Extended resources per pod, requested and limited alike, e.g. "
        "rdma/rdma_shared_device_a: 1 or nvidia.com/hostdev: 8 (cpu, memory and GPUs have their own fields).")
    affinity: dict[str, Any] = Field(default_factory=dict, description="Pod affinity in Kubernetes form (nodeAffinity, "
                                     "podAffinity, podAntiAffinity); checked against the Kubernetes schema at render.")
    pod_patch: dict[str, Any] = Field(
        default_factory=dict, description="A strategic-merge patch of the training pod template ({metadata: ..., spec: "
        "...}, Kubernetes form) for what no field says: applied to a PyTorchJob's replicas and through a TrainJob's "
        "runtimePatches alike; the patched pod is checked against the Pod schema before anything is submitted.")

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keys = {"key", "operator", "value", "effect", "tolerationSeconds"}
        for i, t in enumerate(v):
            if set(t) - keys:
                raise ValueError(f"item {i}: unknown key(s) {sorted(set(t) - keys)} (allowed: {', '.join(sorted(keys))})")
            if t.get("operator", "Equal") not in ("Equal", "Exists"):
                raise ValueError(f"item {i}: operator must be Equal or Exists")
            if t.get("effect", "") not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
                raise ValueError(f"item {i}: effect must be NoSchedule, PreferNoSchedule or NoExecute")
        return [dict(sorted(t.items())) for t in v]  # one key order, so the resolved spec prints the same every time

    @field_validator("env", mode="before")
    @classmethod
    def _env_values(cls, v: Any) -> Any:
        # one line per bad value (a plain union would report both of its branches)
        if not isinstance(v, dict):
            return v
        out = {}
        for name, value in v.items():
            if isinstance(value, dict):
                try:
                    value = KeyRef.model_validate(value)
                except ValidationError as e:
                    first = e.errors(include_url=False)[0]
                    where = ".".join(str(p) for p in first["loc"])
                    text = "required field is missing" if first["type"] == "missing" else first["msg"].removeprefix("Value error, ")
                    raise ValueError(f"{name}: {where + ': ' if where else ''}{text}") from None
            elif isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ValueError(f"{name}: must be a value or {{secret: NAME, key: KEY}} / {{config_map: NAME, key: KEY}}")
            out[name] = _quantity_text(value)
        return out

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str | KeyRef]) -> dict[str, str | KeyRef]:
        for name, value in v.items():
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"'{name}' is not a valid environment variable name")
            if name in RESERVED_ENV or name.startswith("PET_"):
                raise ValueError(f"{name} is set by barlow or the training operator; remove it")
            if isinstance(value, str) and SECRET_LIKE.fullmatch(name):
                raise ValueError(f"{name} looks like a credential: give it as {{secret: <Secret>, key: <key>}}, "
                                 "never as a value in the spec")
        return v

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, v: list[str]) -> list[str]:
        return [_k8s_name(n) for n in v]

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, v: list[VolumeSpec]) -> list[VolumeSpec]:
        names, paths = [x.name for x in v], [x.mount_path.rstrip("/") or "/" for x in v]
        for kind, values, reserved in (("name", names, RESERVED_MOUNTS.keys()), ("mount_path", paths,
                                                                                  RESERVED_MOUNTS.values())):
            taken = sorted({x for x in values if values.count(x) > 1} | {x for x in values if x in reserved})
            if taken:
                raise ValueError(f"{kind} {', '.join(taken)} used twice (barlow mounts dshm at /dev/shm itself)")
        return v

    @field_validator("annotations", "pod_labels")
    @classmethod
    def _keys(cls, v: dict[str, str], info: Any) -> dict[str, str]:
        for key, value in v.items():
            if not QUALIFIED_NAME.fullmatch(key) or len(key.partition("/")[0]) > 253:
                raise ValueError(f"'{key}' is not a valid key (an optional DNS prefix and '/', then a name of at most "
                                 "63 letters, digits, '-', '_', '.')")
            if info.field_name == "pod_labels" and key.startswith(BARLOW_LABEL_PREFIXES):
                raise ValueError(f"'{key}' is one of barlow's own labels")
            if info.field_name == "pod_labels" and not LABEL_VALUE.fullmatch(str(value)):
                raise ValueError(f"label {key}: '{value}' is not a valid label value (at most 63 letters, digits, '-', "
                                 "'_', '.')")
        return v

    @field_validator("extra_resources", mode="before")
    @classmethod
    def _resource_counts_as_text(cls, v: Any) -> Any:
        return {k: _quantity_text(x) for k, x in v.items()} if isinstance(v, dict) else v

    @field_validator("extra_resources")
    @classmethod
    def _extended(cls, v: dict[str, str]) -> dict[str, str]:
        for name, count in v.items():
            prefix, slash, _ = name.partition("/")
            if not slash or not QUALIFIED_NAME.fullmatch(name) or prefix.endswith("kubernetes.io"):
                raise ValueError(f"'{name}' is not an extended resource name (<domain>/<name>, e.g. rdma/hca; "
                                 "cpu and memory have their own fields)")
            if name == "nvidia.com/gpu":
                raise ValueError("nvidia.com/gpu: use cluster.gpus_per_node")
            if not re.fullmatch(r"[0-9]+", count):
                raise ValueError(f"{name}: '{count}' must be a whole number (extended resources are counted)")
        return v

    @field_validator("affinity")
    @classmethod
    def _affinity(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = set(v) - {"nodeAffinity", "podAffinity", "podAntiAffinity"}
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} (allowed: nodeAffinity, podAffinity, podAntiAffinity)")
        return v

    @field_validator("pod_patch")
    @classmethod
    def _pod_patch(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = set(v) - {"metadata", "spec"}
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)}: a pod template patch has metadata and spec")
        return v

    @field_validator("namespace", "service_account", "s3_secret", "priority_class", "queue", "workload_priority_class",
                     "training_runtime")
    @classmethod
    def _dns(cls, v: str | None) -> str | None:
        if v is not None and not K8S_NAME.fullmatch(v):
            raise ValueError(f"'{v}' is not a valid Kubernetes name (lowercase letters, digits, '-')")
        return v


# backend trainjob's rules (barlow.launch.trainjob): what its ClusterTrainingRuntime decides, a TrainJob cannot set
def _trainjob_problems(c: ClusterSpec) -> list[tuple[str, str]]:
    problems = []
    if c.gang != "none":
        problems.append(("cluster.gang", "is for backend pytorchjob; a TrainJob is gang-scheduled by its runtime's "
                                         "podGroupPolicy (see cluster.training_runtime)"))
    if c.priority_class:
        problems.append(("cluster.priority_class", "a TrainJob cannot set its pods' priorityClassName (Trainer v2.3 "
                                                   "runtimePatches has no such field): set it in the runtime, or use "
                                                   "cluster.workload_priority_class with Kueue"))
    for name in ("image_pull_policy", "backoff_limit", "clean_pod_policy"):
        if getattr(c, name) is not None:
            problems.append((f"cluster.{name}", "a TrainJob cannot set it (its ClusterTrainingRuntime decides): remove it, "
                                                "set it in the runtime, or use backend pytorchjob"))
    return problems


def _cluster_problems(c: ClusterSpec) -> list[tuple[str, str]]:
    problems = _trainjob_problems(c) if c.backend == "trainjob" else []
    if c.gang != "none" and c.queue:
        problems.append(("cluster.queue", "Kueue (cluster.queue) admits a job whole already; use it or cluster.gang, not both"))
    if c.workload_priority_class and not c.queue:
        problems.append(("cluster.workload_priority_class", "is read by Kueue: set cluster.queue too"))
    return problems
