"""Run specs: the Pydantic models a spec.yaml is validated against, `load_spec()` and `SpecError`.

One spec describes one run; the same resolved spec reaches the runtime locally and in a pod.
This module imports nothing of barlow (it is the bottom of the house).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# fsspec protocols a run may read from or write to, those the installed filesystems serve (GCS and Azure through
# their S3-compatible endpoints); others are rejected early with a clear message.
WRITABLE_SCHEMES = {"", "file", "s3", "memory"}
READABLE_SCHEMES = WRITABLE_SCHEMES | {"http", "https"}
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2")
# The plug-ins, by kind: the value a spec field accepts -> the module that implements it, imported on first use (most
# need torch; the spec and the CLI image never import them). Adding a plug-in is its module and its line here.
BACKENDS = {"pytorchjob": "barlow.launch.pytorchjob", "trainjob": "barlow.launch.trainjob"}  # cluster.backend
EVAL_PROTOCOLS = {"linear": "barlow.evaluate.linear", "finetune": "barlow.evaluate.finetune"}  # eval.mode
# Training monitors: each module builds its monitor from the spec (None when its settings turn it off).
MONITORS = ("barlow.monitors.probe", "barlow.monitors.knn", "barlow.monitors.rank")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SPEC_ENV = "BARLOW_SPEC"  # the resolved spec's YAML travels to torchrun's processes (local and in pods) in this variable
MULTUS_NETWORKS = "k8s.v1.cni.cncf.io/networks"  # the pod annotation that attaches extra (RDMA) networks
RENDERED_BY_ENV = "BARLOW_RENDERED_BY"  # the barlow version that rendered a pod's spec (named on a version skew)
POD_NAMESPACE_ENV = "BARLOW_POD_NAMESPACE"  # a training pod's namespace (downward API): with the name, the job's identity


class SpecError(Exception):
    """A spec that cannot run: one `field.path: message` line per problem."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        super().__init__("\n".join(problems))

    @classmethod
    def from_validation(cls, err: ValidationError, source: str | None = None) -> SpecError:
        # a cross-field rule carries all its problems in one error, a line each
        return cls([line for e in err.errors(include_url=False) for line in _format_error(e).split("\n")], source)


def _format_error(e: dict[str, Any]) -> str:
    loc = [str(p) for p in e["loc"]]
    root = {"pretrain": PretrainSpec, "eval": EvalRunSpec}.get(loc[0]) if loc else None
    if root:
        loc = loc[1:]  # drop the discriminator tag pydantic puts first
    path = ".".join(loc)
    if e["type"] == "spec_rule":  # cross-field rules carry their own field path
        return e["msg"]
    if e["type"] == "union_tag_invalid":
        return f"kind: must be 'pretrain' or 'eval' (got '{e['ctx']['tag']}')"
    if e["type"] == "extra_forbidden":
        return f"{path}: unknown field{_did_you_mean(root, loc)}"
    if e["type"] == "missing":
        return f"{path}: required field is missing"
    msg = e["msg"]
    msg = msg[len("Value error, "):] if msg.startswith("Value error, ") else msg
    return f"{path}: {msg}" if path else msg


def _did_you_mean(root: type[BaseModel] | None, loc: list[str]) -> str:
    """A field name for an unknown key: the same name in another section (`data.batch_size` -> `optim.batch_size`),
    else a close name in its own section."""
    elsewhere = [p for p in _field_paths(root) if p.rsplit(".", 1)[-1] == loc[-1] and p != ".".join(loc)]
    if elsewhere:
        return f" (did you mean '{elsewhere[0]}'?)"
    model = root
    for part in loc[:-1]:  # walk down to the section that holds the unknown key
        field = model.model_fields.get(part) if model else None
        model = _section_of(field.annotation) if field else None
    names = list(model.model_fields) if model else []
    close = difflib.get_close_matches(loc[-1], names, n=1) or [n for n in names if n.startswith(loc[-1])][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _section_of(annotation: Any) -> type[BaseModel] | None:
    args = getattr(annotation, "__args__", ())
    if type(None) in args and len(args) == 2:  # an optional section (an eval spec's `model`)
        annotation = next(a for a in args if a is not type(None))
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _field_paths(model: type[BaseModel] | None, prefix: str = "") -> list[str]:
    """Every dotted field path of a spec model, sections included, shallowest first."""
    if model is None:
        return []
    paths = [prefix + name for name in model.model_fields]
    for name, field in model.model_fields.items():
        paths += _field_paths(_section_of(field.annotation), f"{prefix}{name}.")
    return paths


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# schemes a user may mean (served or not): a local path that starts like one of them is a mistyped URL
KNOWN_SCHEMES = READABLE_SCHEMES - {""} | {"s3a", "gs", "gcs", "az", "abfs", "abfss", "hdfs", "ftp", "sftp"}
_MISTYPED_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)(?::/?(?!/)|//)")


def _check_url(url: str, schemes: set[str]) -> str:
    url = url.strip()
    if not url:
        raise ValueError("must not be empty")
    mistyped = _MISTYPED_URL.match(url) if "://" not in url else None
    if mistyped and mistyped["scheme"].lower() in KNOWN_SCHEMES:
        scheme = mistyped["scheme"].lower()
        meant = f"{scheme}://{'/' if scheme == 'file' else ''}{url[mistyped.end():]}"
        raise ValueError(f"'{url}' is neither a URL nor a plain path: write {meant} (a URL has '://' after its "
                         f"scheme), or ./{url} for a local folder of that name")
    if "://" in url and re.search(r"\s", url.split("://", 1)[1].split("/", 1)[0]):
        raise ValueError(f"'{url}' has white space in its bucket or host name, which never holds any")
    scheme = urlparse(url).scheme if "://" in url else ""
    if scheme not in schemes:
        raise ValueError(f"unsupported URL scheme '{scheme}://' (use a local path or one of: "
                         + ", ".join(sorted(s + "://" for s in schemes if s)) + ")")
    if scheme and not urlparse(url).netloc and scheme not in ("file", "memory"):
        raise ValueError(f"'{url}' has no bucket or host after '{scheme}://'")
    return url


def check_url(url: str, *, write: bool) -> str:
    """A URL as the spec accepts it for reading (data.*) or writing (output.url); raises ValueError naming the problem."""
    return _check_url(url, WRITABLE_SCHEMES if write else READABLE_SCHEMES)


ReadURL = Annotated[str, Field(min_length=1)]


def _quantity_text(v: Any) -> Any:
    # `cpu: 8` is a YAML int; a Kubernetes quantity is its decimal text (bool is an int too, and no quantity)
    return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")


def _check_quantity(v: str) -> str:
    if not QUANTITY.fullmatch(str(v)):
        raise ValueError(f"'{v}' is not a Kubernetes quantity (e.g. 8, 500m, 32Gi)")
    return str(v)


Quantity = Annotated[str, BeforeValidator(_quantity_text), AfterValidator(_check_quantity)]  # cpu: 8 or memory: 32Gi


class S3Spec(Section):
    """How to reach an S3-compatible store. Credentials never go here: they come from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or, on a cluster, from the Secret named in `cluster.s3_secret`."""

    endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. http://minio:9000; unset for AWS.")
    region: str | None = Field(None, description="Region name; unset for the store's default.")
    addressing_style: Literal["auto", "virtual", "path"] = Field("auto", description="Bucket addressing style.")
    retries: int = Field(10, ge=0, le=100, description="Attempts for throttled (503 SlowDown) or transient errors.")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and urlparse(v).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        if v is not None and "@" in urlparse(v).netloc:
            raise ValueError("must not contain credentials (use the environment or a Secret)")
        return v


class AugmentSpec(Section):
    """BYOL's two asymmetric views (view 1, view 2): the one place their rules are checked
    (barlow.augment.ViewsConfig.from_augment builds the views from this section)."""

    min_scale: float = Field(0.08, gt=0, le=1, description="Smallest crop area fraction of RandomResizedCrop.")
    flip_prob: float = Field(0.5, ge=0, le=1, description="Horizontal flip probability (both views).")
    jitter_prob: float = Field(0.8, ge=0, le=1, description="ColorJitter(0.4, 0.4, 0.2, 0.1) probability (both views).")
    grayscale_prob: float = Field(0.2, ge=0, le=1, description="Grayscale probability (both views).")
    blur_prob: list[float] = Field([1.0, 0.1], description="Gaussian blur probability of view 1 and view 2.")
    solarize_prob: list[float] = Field([0.0, 0.2], description="Solarize probability of view 1 and view 2.")

    @field_validator("blur_prob", "solarize_prob")
    @classmethod
    def _probs(cls, v: list[float]) -> list[float]:
        if len(v) != 2:
            raise ValueError(f"must have 2 values, one per view (got {len(v)})")
        if not all(0.0 <= p <= 1.0 for p in v):
            raise ValueError("each probability must be between 0 and 1")
        return v


DATA_FORMATS = {"imagefolder": "barlow.data.imagefolder", "shards": "barlow.data.shardreader",  # data.format (plug-ins, as BACKENDS)
                "webdataset": "barlow.data.shardreader", "parquet": "barlow.data.shardreader"}


class DataSpec(Section):
    """Where the images are and how they are read."""

    format: Literal[tuple(DATA_FORMATS)] = Field(  # type: ignore[valid-type]
        "imagefolder", description="imagefolder: a folder of images (any layout; labels: data.labels); shards: the JSON "
        "index written by `barlow data shard`; webdataset: tar shards other tools wrote (a sample is the members sharing "
        "a key; image: the first of jpg, jpeg, png, webp; label: .cls or .json's label/cls, else none); parquet: an image "
        "column as Hugging Face datasets writes it (struct<bytes, path>), an optional integer label column.")
    train: ReadURL = Field(description="Training images: a folder (imagefolder), an index.json URL (shards), or a "
                           "brace pattern (s3://b/x/shard-{000000..000099}.tar) or folder of .tar (webdataset), a folder or glob of "
                           ".parquet (parquet).")
    val: ReadURL | None = Field(None, description="Validation images, same format as train; needed by eval.")
    image_size: int = Field(224, ge=8, le=1024, description="Side of the square crops fed to the model, in pixels.")
    channels: Literal[1, 3] = Field(3, description="Channels the model sees: 3 (RGB) or 1 (grayscale).")
    workers: int = Field(4, ge=0, le=64, description="Data-loader worker processes per training process.")
    shuffle_buffer: int = Field(1000, ge=0, le=1_000_000, description="Samples held for shuffling shards (0: none).")
    on_corrupt: Literal["skip", "fail"] = Field("skip", description="What an undecodable image does: skipped and counted, or fail the run.")
    labels: Literal["auto", "folders", "none"] = Field(
        "auto", description="Labels of an image folder. auto: from the folders only in the class layout (every image "
        "exactly one folder below data.train, in at least two such folders); any other layout (flat, nested by date or "
        "camera) is unlabelled. folders: each image's top folder is its class. none: unlabelled.")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Where training images are decoded: cpu (loader workers decode the crops), gpu (workers only "
        "read bytes and choose crops; the GPU decodes the batch; needs a CUDA device), auto: gpu when the run is on CUDA.")
    augment: AugmentSpec = Field(default_factory=AugmentSpec, description="The two-view augmentation.")
    s3: S3Spec = Field(default_factory=S3Spec, description="S3 connection settings for s3:// URLs.")

    @field_validator("train", "val")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else _check_url(v, READABLE_SCHEMES)


class LabelledDataSpec(Section):
    """A labelled image set beside unlabelled pretraining data (the other data.* settings are data's)."""

    format: Literal[tuple(DATA_FORMATS)] = Field("imagefolder", description="As data.format.")  # type: ignore[valid-type]
    train: ReadURL = Field(description="Labelled training images (class folders, or a shard index).")
    val: ReadURL = Field(description="Labelled validation images, same format.")

    @field_validator("train", "val")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_url(v, READABLE_SCHEMES)

    def over(self, data: DataSpec) -> DataSpec:
        """data.* with this set's format and URLs, labels from its folders."""
        return data.model_copy(update={"format": self.format, "train": self.train, "val": self.val, "labels": "auto"})


class ModelSpec(Section):
    """Encoder and projector."""

    arch: Literal[ARCHS] = Field("resnet50", description="torchvision ResNet used as the encoder.")  # type: ignore[valid-type]
    projector: str = Field("8192-8192-8192", description="Projector layer widths, e.g. 8192-8192-8192.")
    small_images: bool = Field(False, description="3x3 stride-1 stem without max-pool, for 28-64 px images.")
    width: int = Field(64, ge=4, le=256, description="Channels of the first stage (64 is torchvision's layout).")

    @field_validator("projector")
    @classmethod
    def _projector(cls, v: str) -> str:
        if not re.fullmatch(r"[1-9][0-9]*(-[1-9][0-9]*)*", v):
            raise ValueError("must be widths joined by '-', e.g. 8192-8192-8192")
        if any(int(w) > 65536 for w in v.split("-")):
            raise ValueError("widths must be at most 65536")
        return v


class OptimSpec(Section):
    """LARS with warmup + cosine; the paper's values are the defaults."""

    epochs: int = Field(1000, ge=1, le=100_000, description="Passes over the training set.")
    batch_size: int = Field(2048, ge=2, le=1_000_000, description="Global batch size, summed over all processes.")
    lr_weights: float = Field(0.2, gt=0, le=100, description="Base lr for weights; peak = base * batch_size / 256.")
    lr_biases: float = Field(0.0048, gt=0, le=100, description="Base lr for biases and BatchNorm parameters.")
    weight_decay: float = Field(1.5e-6, ge=0, le=1, description="LARS weight decay (weights only).")
    momentum: float = Field(0.9, ge=0, lt=1, description="LARS momentum.")
    lars_eta: float = Field(0.001, gt=0, le=1, description="LARS trust coefficient: a weight's step is scaled to eta "
                            "x ||w|| / ||update|| (the paper's 0.001; small-image recipes use up to 0.02).")
    lambd: float = Field(5e-3, ge=0, le=1, description="Weight of the off-diagonal (redundancy) term.")
    warmup_epochs: float = Field(10, ge=0, description="Epochs of linear lr warmup.")


class RuntimeSpec(Section):
    """Processes, device and numerics."""

    nodes: int = Field(1, ge=1, le=1024, description="Machines (pods); 1 for a local run.")
    nproc_per_node: int = Field(1, ge=1, le=64, description="Processes per machine (GPUs per node on a cluster).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast where the hardware has it "
                                                       "natively (not where it is emulated, as on V100 and T4).")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for weights, augmentation and data order.")
    log_every: int = Field(10, ge=1, le=100_000, description="Steps between metric lines (and, with several "
                           "processes, between checks for a stop signal).")
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the model. auto: off for now "
                                                  "(on the CPU, and on CUDA until bench/gpu.py shows it wins).")
    collective_timeout_s: int = Field(1800, ge=60, le=86_400, description="Seconds a collective (or the barrier while "
                                      "rank 0 writes a checkpoint) may wait before the run fails and is retried.")

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


class MlflowSpec(Section):
    """An MLflow tracking server (or a local file store) that receives the run's params, metrics and exported backbone.
    Needs the `mlflow` extra (pip install 'barlow[mlflow]'); credentials come from MLFLOW_TRACKING_* in the environment."""

    tracking_uri: str = Field(min_length=1, description="MLflow tracking URI: http(s)://server:5000, databricks, or file:///path.")
    experiment: str = Field("barlow", min_length=1, max_length=500, description="MLflow experiment the run is logged under.")

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri(cls, v: str) -> str:
        if "@" in urlparse(v).netloc:
            raise ValueError("must not contain credentials (set MLFLOW_TRACKING_USERNAME / _PASSWORD or _TOKEN)")
        return v


_STEPS = TypeAdapter(Annotated[int, Field(strict=False, ge=1, le=10_000_000)])


class OutputSpec(Section):
    """Where checkpoints, metrics and exports go."""

    url: str = Field(description="Output folder: a local path or s3://bucket/prefix.")
    checkpoint_every: Annotated[int, Field(ge=1, le=10_000_000)] | Literal["auto"] = Field(
        500, description="Optimizer steps between checkpoints (one is also written at the end); auto: the Young/Daly "
                         "interval the run works out at its first log step from its step time, its state's size and "
                         "cluster.node_mtbf_hours (as `barlow plan` prints it).")
    keep: int = Field(3, ge=1, le=1000, description="Complete checkpoints kept; older ones are deleted.")
    mlflow: MlflowSpec | None = Field(None, description="Also log to MLflow (TensorBoard and metrics.jsonl are always written).")

    @field_validator("checkpoint_every", mode="wrap")
    @classmethod
    def _every(cls, v: Any, handler: Any) -> int | str:
        """One error line for either form (the union would give one per branch)."""
        if v == "auto":
            return v
        try:
            return _STEPS.validate_python(v)
        except ValidationError as e:
            raise PydanticCustomError("checkpoint_every", "{msg} (or auto)", {"msg": e.errors()[0]["msg"]}) from None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_url(v, WRITABLE_SCHEMES).rstrip("/")


class EvalRuntimeSpec(Section):
    """Where a pretrain spec's follow-up eval runs: one node by default; unset fields are the pretrain run's."""

    nodes: int = Field(1, ge=1, le=1024, description="Machines (pods) of the eval: a linear probe rarely needs more than one.")
    nproc_per_node: int | None = Field(None, ge=1, le=64, description="Processes per machine (unset: eval.cluster.gpus_per_node "
                                       "when set, else the pretrain spec's runtime.nproc_per_node).")


class EvalClusterSpec(Section):
    """The follow-up eval's pod resources; each unset field is the pretrain spec's `cluster` value."""

    gpus_per_node: int | None = Field(None, ge=0, le=64, description="nvidia.com/gpu per eval pod (unset: the eval's "
                                      "processes per node when the pretrain pods have GPUs, else 0).")
    cpu: Quantity | None = Field(None, description="CPU request and limit per eval pod (unset: cluster.cpu).")
    memory: Quantity | None = Field(None, description="Memory request and limit per eval pod (unset: cluster.memory).")
    shm_size: Quantity | None = Field(None, description="/dev/shm of an eval pod (unset: cluster.shm_size).")
    extra_resources: dict[str, str] | None = Field(
        None, description="Extended resources per eval pod (unset: cluster.extra_resources, each count scaled to the "
        "eval's GPUs when an eval pod has fewer GPUs than a pretrain pod: count x eval GPUs / pretrain GPUs, rounded "
        "up, so nvidia.com/hostdev: 8 becomes 1 for one GPU; none when the eval pods have no GPU).")
    annotations: dict[str, str] | None = Field(
        None, description="Eval pod annotations (unset: cluster.annotations, without the Multus network annotation "
        f"{MULTUS_NETWORKS} when the eval runs on one node: its processes need no fabric between nodes).")

    @field_validator("extra_resources", mode="before")
    @classmethod
    def _resource_counts_as_text(cls, v: Any) -> Any:
        return ClusterSpec._resource_counts_as_text(v)

    @field_validator("extra_resources")
    @classmethod
    def _extended(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else ClusterSpec._extended(v)

    @field_validator("annotations")
    @classmethod
    def _keys(cls, v: dict[str, str] | None, info: Any) -> dict[str, str] | None:
        return None if v is None else ClusterSpec._keys(v, info)

    def extra_resources_for(self, cluster: ClusterSpec, gpus: int) -> dict[str, str]:
        """The eval pod's extended resources: this field, else the pretrain pod's, scaled to `gpus` where fewer."""
        if self.extra_resources is not None:
            return self.extra_resources
        have = cluster.gpus_per_node
        if not have or gpus >= have:
            return dict(cluster.extra_resources)
        if gpus == 0:
            return {}
        return {name: str(-(-int(count) * gpus // have)) for name, count in cluster.extra_resources.items()}

    def annotations_for(self, cluster: ClusterSpec, nodes: int) -> dict[str, str]:
        """The eval pod's annotations: this field, else the pretrain pod's, on one node without the Multus networks."""
        if self.annotations is not None:
            return self.annotations
        return {k: v for k, v in cluster.annotations.items() if not (nodes == 1 and k == MULTUS_NETWORKS)}


class EvalSpec(Section):
    """Linear evaluation (or fine-tuning) of a pretrained backbone."""

    mode: Literal[tuple(EVAL_PROTOCOLS)] = Field(  # type: ignore[valid-type]
       "linear", description="linear: frozen backbone; finetune: train it too.")
    train_percent: Literal[100, 10, 1] = Field(100, description="Labelled training images used, per class (deterministic subset).")
    epochs: int = Field(100, ge=1, le=10_000, description="Epochs of the classifier.")
    batch_size: int = Field(256, ge=1, le=1_000_000, description="Global batch size.")
    lr_head: float = Field(0.3, gt=0, le=100, description="SGD lr of the linear layer (cosine-decayed).")
    lr_backbone: float = Field(0.0, ge=0, le=100, description="SGD lr of the backbone (finetune only).")
    weight_decay: float = Field(1e-6, ge=0, le=1, description="SGD weight decay.")
    knn_k: int = Field(20, ge=1, le=1000, description="Neighbours of the kNN monitor (cosine similarity).")
    checkpoint: str | None = Field(None, description="Pretrain output folder or checkpoint URL to evaluate.")
    backbone: str | None = Field(None, description="Exported backbone state_dict URL to evaluate instead.")

    @field_validator("checkpoint", "backbone")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else _check_url(v, READABLE_SCHEMES).rstrip("/")

    @field_validator("checkpoint")
    @classmethod
    def _a_folder(cls, v: str | None) -> str | None:
        if v is not None and v.endswith(".pt"):
            raise ValueError(f"'{v}' is a file: an exported backbone goes in eval.backbone; eval.checkpoint names a "
                             "pretrain output folder or one of its checkpoint folders (checkpoints/step-N)")
        return v


class FollowUpEvalSpec(EvalSpec):
    """A pretrain spec's `eval`: the evaluation its pipeline runs next, with that run's own size (an eval spec has
    top-level `runtime` and `cluster` instead)."""

    data: LabelledDataSpec | None = Field(None, description="The labelled images the eval trains and measures on "
                                          "(unset: the pretraining's data.train and data.val); needed when the "
                                          "pretraining data has no labels.")
    runtime: EvalRuntimeSpec = Field(default_factory=EvalRuntimeSpec, description="The eval's nodes and processes.")
    cluster: EvalClusterSpec = Field(default_factory=EvalClusterSpec, description="The eval's GPUs and resources per pod.")

    def placement(self, runtime: RuntimeSpec, cluster: ClusterSpec) -> tuple[dict[str, Any], dict[str, Any]]:
        """The eval's `runtime` and `cluster` sections: these overrides on the pretrain run's. Nodes default to one;
        processes per node follow eval GPUs when only those are set; GPUs follow the processes when the pretrain
        pods have GPUs; extended resources follow the GPUs, and a one-node eval leaves the Multus networks out."""
        r, c = self.runtime, self.cluster
        nproc = r.nproc_per_node or c.gpus_per_node or runtime.nproc_per_node
        gpus = c.gpus_per_node if c.gpus_per_node is not None else (nproc if cluster.gpus_per_node else 0)
        resources = {k: v for k, v in c.model_dump(include={"cpu", "memory", "shm_size"}).items() if v is not None}
        return ({**runtime.model_dump(), "nodes": r.nodes, "nproc_per_node": nproc},
                {**cluster.model_dump(), "gpus_per_node": gpus, **resources,
                 "extra_resources": c.extra_resources_for(cluster, gpus), "annotations": c.annotations_for(cluster, r.nodes)})


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


class MonitorSpec(Section):
    """Quality while pretraining runs: an online linear probe on the training batches and a periodic kNN."""

    online_probe: Literal["auto", "on", "off"] = Field(
        "auto", description="A linear classifier on view 1's detached, pooled backbone features, trained on the batches' "
                            "labels by its own optimizer; its running top-1 is logged as probe_top1. auto: on when the "
                            "training data has more than one class.")
    probe_lr: float = Field(0.1, gt=0, le=100, description="SGD lr of the online probe (momentum 0.9, constant).")
    knn_every_epochs: int | None = Field(
        None, ge=0, le=100_000, description="Epochs between kNN top-1 measurements on data.val (also one at the end); "
                                             "0: off. Unset: 10 when data.val is set, else off.")
    knn_images: int = Field(5000, ge=1, description="Validation images of the kNN: the smallest of the 1 %, 10 % or "
                                                    "100 % label subsets that holds at least this many (fixed).")
    knn_train_images: int = Field(20000, ge=1, description="Training images the kNN compares against (eval transform), "
                                                           "chosen as knn_images is.")
    knn_k: int = Field(20, ge=1, le=1000, description="Neighbours of the kNN (cosine similarity, weighted vote).")
    rank_every_epochs: int | None = Field(
        None, ge=0, le=100_000, description="Epochs between label-free quality measurements (also one at the end): "
        "RankMe (exp of the entropy of the normalised singular values) of the backbone features and the projector "
        "output, and the fraction of near-constant projector dimensions, on a fixed sample of the training images; "
        "0: off. Unset: the fewest epochs that keep its cost within 1 % of training (a forward pass of rank_images "
        "against an epoch's two views forward and backward: every ceil(100 x rank_images / (6 x images)) epochs).")
    rank_images: int = Field(512, ge=2, le=65_536, description="Training images of that fixed sample (eval transform).")
    collapse_fraction: float = Field(0.05, gt=0, lt=1, description="`barlow status` warns of collapse when the "
                                     "projector output's RankMe falls below this fraction of its largest possible value "
                                     "(the smaller of its dimension and rank_images).")
    data: LabelledDataSpec | None = Field(None, description="A labelled set the kNN measures on (its train against its "
                                          "val) instead of data.*; with unlabelled pretraining data the kNN is off "
                                          "without it, and the online probe (it needs the training batches' labels) is off.")

    @field_validator("online_probe", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML 1.1 reads a bare on/off as a bool

    def rank_every(self, images: int) -> int:
        """Epochs between rank measurements for a training set of `images` (0: off)."""
        if self.rank_every_epochs is not None:
            return self.rank_every_epochs
        return max(1, -(-100 * min(self.rank_images, images) // (6 * max(images, 1))))

    def knn_every(self, has_val: bool) -> int:
        """Epochs between kNN measurements for this data (0: no kNN)."""
        if self.knn_every_epochs is None:
            return 10 if has_val else 0
        return self.knn_every_epochs


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


def _cluster_problems(c: ClusterSpec) -> list[tuple[str, str]]:
    problems = []
    if c.backend == "trainjob" and c.gang != "none":
        problems.append(("cluster.gang", "is for backend pytorchjob; a TrainJob is gang-scheduled by its runtime's "
                                         "podGroupPolicy (see cluster.training_runtime)"))
    if c.backend == "trainjob" and c.priority_class:
        problems.append(("cluster.priority_class", "a TrainJob cannot set its pods' priorityClassName (Trainer v2.3 "
                                                   "runtimePatches has no such field): set it in the runtime, or use "
                                                   "cluster.workload_priority_class with Kueue"))
    for name in ("image_pull_policy", "backoff_limit", "clean_pod_policy"):
        if c.backend == "trainjob" and getattr(c, name) is not None:
            problems.append((f"cluster.{name}", "a TrainJob cannot set it (its ClusterTrainingRuntime decides): remove it, "
                                                "set it in the runtime, or use backend pytorchjob"))
    if c.gang != "none" and c.queue:
        problems.append(("cluster.queue", "Kueue (cluster.queue) admits a job whole already; use it or cluster.gang, not both"))
    if c.workload_priority_class and not c.queue:
        problems.append(("cluster.workload_priority_class", "is read by Kueue: set cluster.queue too"))
    return problems


class RunSpec(Section):
    """Fields shared by every kind of run."""

    name: str = Field(min_length=1, max_length=50, description="Run name; the Kubernetes job name derives from it.")
    data: DataSpec = Field(description="Training and validation images.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Encoder and projector.")
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec, description="Processes, device and numerics.")
    output: OutputSpec = Field(description="Where results are written.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Placement on Kubernetes.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not DNS_1035.match(v):
            raise ValueError("must be lowercase letters, digits and '-', starting with a letter (a DNS-1035 label)")
        return v

    def _problems(self) -> list[tuple[str, str]]:
        problems = []
        r, c = self.runtime, self.cluster
        if c.gpus_per_node and c.gpus_per_node != r.nproc_per_node:
            problems.append(("cluster.gpus_per_node", f"must equal runtime.nproc_per_node ({r.nproc_per_node}) when GPUs are requested"))
        if r.device == "cuda" and r.nodes > 1 and c.gpus_per_node == 0:
            problems.append(("cluster.gpus_per_node", "must be set when runtime.device is cuda on several nodes"))
        problems += _cluster_problems(c)
        if self.data.format == "shards" and not self.data.train.endswith(".json"):
            problems.append(("data.train", "must point at the shards' index .json when data.format is shards"))
        if self.data.decode == "gpu" and self.runtime.device == "cpu":
            problems.append(("data.decode", "gpu needs a CUDA device; runtime.device is cpu (use decode: cpu or auto)"))
        return problems

    @model_validator(mode="after")
    def _rules(self) -> RunSpec:
        problems = self._problems()
        if problems:
            raise PydanticCustomError("spec_rule", "\n".join(f"{p}: {m}" for p, m in problems))
        return self

    def spec_hash(self) -> str:
        """A short, stable hash of the resolved spec (labels, idempotent submit)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class PretrainSpec(RunSpec):
    """A Barlow Twins pretraining run, optionally followed by an evaluation (`eval`)."""

    kind: Literal["pretrain"] = Field(description="Run kind.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer and schedule.")
    monitor: MonitorSpec = Field(default_factory=MonitorSpec, description="Online probe and kNN while pretraining runs.")
    eval: FollowUpEvalSpec = Field(default_factory=FollowUpEvalSpec, description="The evaluation that follows pretraining "
                                   "in a pipeline, and its size (one node by default).")

    def _problems(self) -> list[tuple[str, str]]:
        problems = super()._problems()
        o, world = self.optim, self.runtime.world_size
        if o.batch_size % world:
            problems.append(("optim.batch_size", f"must be divisible by {world} (nodes × nproc_per_node)"))
        if o.warmup_epochs >= o.epochs:
            problems.append(("optim.warmup_epochs", f"must be shorter than optim.epochs ({o.epochs})"))
        if self.eval.checkpoint or self.eval.backbone:
            problems.append(("eval.checkpoint", "is set by the pipeline from output.url; leave it out of a pretrain spec"))
        if self.monitor.knn_every_epochs and self.data.val is None and self.monitor.data is None:
            problems.append(("monitor.knn_every_epochs", "the kNN measures on data.val: set data.val (or monitor.data), "
                                                         "or 0 to turn it off"))
        return problems

    def eval_spec(self) -> EvalRunSpec:
        """The evaluation of this run's checkpoint, writing beside it (what `pipeline` runs second)."""
        d = self.model_dump(exclude={"kind", "optim", "monitor", "eval", "name", "output", "runtime", "cluster"})
        runtime, cluster = self.eval.placement(self.runtime, self.cluster)
        if self.eval.data is not None:
            d["data"] = self.eval.data.over(self.data).model_dump()
        return EvalRunSpec.model_validate({
            **d, "kind": "eval", "name": f"{self.name[:45]}-eval", "runtime": runtime, "cluster": cluster,
            "eval": {**self.eval.model_dump(exclude={"runtime", "cluster", "data"}), "checkpoint": self.output.url},
            "output": {"url": f"{self.output.url}/eval", "keep": self.output.keep},
        })


class EvalRunSpec(RunSpec):
    """A linear-evaluation (or fine-tuning) run of a pretrained backbone."""

    kind: Literal["eval"] = Field(description="Run kind.")
    eval: EvalSpec = Field(description="What to evaluate and how.")
    model: ModelSpec | None = Field(None, description="The backbone's encoder. Unset: the one the pretraining recorded "
                                    "in its checkpoints (eval.checkpoint, or the output folder an eval.backbone lies "
                                    "in), else the defaults; set, it must match those weights.")

    def _problems(self) -> list[tuple[str, str]]:
        problems = super()._problems()
        e, world = self.eval, self.runtime.world_size
        if not (e.checkpoint or e.backbone):
            problems.append(("eval.checkpoint", "an eval needs eval.checkpoint or eval.backbone"))
        if e.checkpoint and e.backbone:
            problems.append(("eval.backbone", "set eval.checkpoint or eval.backbone, not both"))
        if self.data.val is None:
            problems.append(("data.val", "an eval needs validation images"))
        if e.batch_size % world:
            problems.append(("eval.batch_size", f"must be divisible by {world} (nodes × nproc_per_node)"))
        if e.mode == "linear" and e.lr_backbone > 0:
            problems.append(("eval.lr_backbone", "must be 0 in linear mode (the backbone is frozen)"))
        return problems


AnySpec = Annotated[PretrainSpec | EvalRunSpec, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[PretrainSpec | EvalRunSpec] = TypeAdapter(AnySpec)


def parse_spec(data: Any, source: str | None = None) -> PretrainSpec | EvalRunSpec:
    """Validate a spec given as a dict; raises SpecError."""
    if not isinstance(data, dict):
        raise SpecError([f"{source or 'spec'}: must be a mapping of sections (kind, name, data, ...)"], source)
    if "kind" not in data:
        raise SpecError(["kind: required field is missing (pretrain or eval)"], source)
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        raise SpecError.from_validation(err, source) from None


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> PretrainSpec | EvalRunSpec:
    """Read and validate a spec file (UTF-8 YAML), with `--set key.path=value` overrides; raises SpecError naming the
    file or the fields."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError([f"{path}: no such file"], str(path)) from None
    except IsADirectoryError:
        raise SpecError([f"{path}: is a folder, not a spec file"], str(path)) from None
    except OSError as e:
        raise SpecError([f"{path}: cannot read ({e.strerror})"], str(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError([f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the spec "
                         "as UTF-8"], str(path)) from None
    return loads_spec(text, str(path), overrides)


def loads_spec(text: str, source: str = "spec", overrides: Sequence[str] = ()) -> PretrainSpec | EvalRunSpec:
    """Validate a spec given as YAML text (a file's content, or BARLOW_SPEC in a pod), with `--set` overrides."""
    data = _yaml_load(text, source)
    if not overrides:
        return parse_spec(data, source)
    if not isinstance(data, dict):
        return parse_spec(data, source)  # the one-line "must be a mapping" error
    changed = {}
    for item in overrides:
        key, value = parse_override(item)
        try:
            data = set_path(data, key, value)
        except SpecError as e:
            raise SpecError([f"--set {item}: {e.problems[0]}"], source) from None
        changed[key] = item
    try:
        return parse_spec(data, source)
    except SpecError as e:
        raise SpecError([_from_override(line, changed) for line in e.problems], source) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_unique_keys(node, [], set())
        return super().construct_document(node)


class DuplicateKey(yaml.YAMLError):
    def __init__(self, path: str, line: int, first: int):
        super().__init__(f"duplicate key '{path}' (first at line {first}); a key may appear once")
        self.path, self.line, self.first = path, line, first


def _check_unique_keys(node: yaml.Node, path: list[str], seen: set[int]) -> None:
    if id(node) in seen:  # an alias repeats a node already checked (and may point back at its parent)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                _check_unique_keys(value, path, seen)
                continue
            here = key.start_mark.line + 1
            if (key.tag, key.value) in first:
                raise DuplicateKey(".".join([*path, key.value]), here, first[(key.tag, key.value)])
            first[(key.tag, key.value)] = here
            _check_unique_keys(value, [*path, key.value], seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, [*path, str(i)], seen)


def _yaml_load(text: str, source: str) -> Any:
    """YAML text as Python data; any YAML problem (duplicate keys included) is one SpecError line with its line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe
    except DuplicateKey as e:
        raise SpecError([f"{source}: line {e.line}: {e}"], source) from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}:" if where else ""
        raise SpecError([f"{source}:{line} not valid YAML ({getattr(e, 'problem', None) or e})"], source) from None


OVERRIDE_HELP = "Set a spec field, as in the file: key.path=value (repeatable; the value is YAML: 4, true, [1.0, 0.1])."


def parse_override(item: str) -> tuple[str, Any]:
    """`key.path=value` as (key path, the value parsed as YAML); raises SpecError naming the item."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError([f"--set {item}: must be key.path=value (e.g. --set optim.epochs=100)"])
    try:
        value = _yaml_load(text, f"--set {key}")  # empty: null, as in a YAML file
    except SpecError as e:
        raise SpecError([e.problems[0]]) from None
    return key, value


def _from_override(line: str, changed: dict[str, str]) -> str:
    """A validation line about a field that `--set` gave says so."""
    field = line.split(": ", 1)[0]
    item = changed.get(field)
    return f"{line} (from --set {item})" if item else line


def dump_spec(spec: RunSpec) -> str:
    """The resolved spec as YAML (what `barlow validate` prints and a pod receives)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


class Stage(StrEnum):
    """What `barlow run|render|submit STAGE` makes of a spec (the rules are `stage_runs`)."""

    pretrain = "pretrain"
    eval = "eval"
    pipeline = "pipeline"


STAGE_HELP = "pretrain, eval (of an eval spec, or of a pretrain spec's checkpoint), or pipeline (pretrain, then eval)."


def follow_up_eval(spec: PretrainSpec) -> EvalRunSpec:
    """The eval of a pretrain spec's checkpoint; raises SpecError naming it (checked before anything runs)."""
    try:
        return spec.eval_spec()
    except ValidationError as e:
        err = SpecError.from_validation(e, "the follow-up eval")
        raise SpecError([_override_path(p) for p in err.problems], err.source) from None


def _override_path(problem: str) -> str:
    # a problem with the eval's size is fixed in the pretrain spec's eval.runtime / eval.cluster: name that field
    section, _, rest = problem.partition(".")
    model = {"runtime": EvalRuntimeSpec, "cluster": EvalClusterSpec}.get(section)
    return f"eval.{problem}" if model and rest.split(":", 1)[0] in model.model_fields else problem


UNLABELLED_EVAL = ("eval.data: the pretraining data has no labels ({what}); the eval needs a labelled set: set "
                   "eval.data (train, val, format)")


def stage_runs(spec: PretrainSpec | EvalRunSpec, stage: str, source: str | None = None) -> list[PretrainSpec | EvalRunSpec]:
    """The runs `stage` makes of `spec`, in order: pretrain [spec]; eval [spec] for an eval spec, the follow-up eval
    for a pretrain spec; pipeline [spec, its follow-up eval]. Raises SpecError before anything runs or is submitted."""
    if stage in (Stage.pretrain, Stage.pipeline) and not isinstance(spec, PretrainSpec):
        raise SpecError([f"kind is '{spec.kind}'; `{stage}` needs a pretrain spec"], source)
    if stage not in tuple(Stage):
        raise SpecError([f"stage must be one of {', '.join(Stage)} (got '{stage}')"], source)
    if isinstance(spec, EvalRunSpec):
        return [spec]
    if stage == Stage.pretrain:
        return [spec]
    if spec.data.labels == "none" and spec.eval.data is None:
        raise SpecError([UNLABELLED_EVAL.format(what="data.labels is none")], source)
    return [follow_up_eval(spec)] if stage == Stage.eval else [spec, follow_up_eval(spec)]


REMOVE = object()  # a value for set_path: delete the field instead of setting it


def set_path(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of a spec's dict with the dotted `path` set to `value` (REMOVE deletes it); raises SpecError
    where the path runs through a value that is not a section."""
    out = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = out
    for i, p in enumerate(parents):
        if node.get(p) is None:  # an absent section, or one written empty (`eval:`)
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise SpecError([f"{'.'.join(parents[:i + 1])}: is a value, not a section (it has no field "
                             f"'{'.'.join([*parents[i + 1:], last])}')"])
    if value is REMOVE:
        node.pop(last, None)
    else:
        node[last] = value
    return out


def with_fields(spec: RunSpec, changes: dict[str, Any], source: str | None = None) -> PretrainSpec | EvalRunSpec:
    """The spec with dotted fields changed (`{"runtime.nproc_per_node": 4}`), validated again; raises SpecError."""
    data = spec.model_dump(mode="json")
    for path, value in changes.items():
        data = set_path(data, path, value)
    return parse_spec(data, source)


def json_schema() -> dict[str, Any]:
    """JSON schema of a spec file, for editors."""
    schema = _ADAPTER.json_schema()
    schema["title"] = "barlow run spec"
    for model in (PretrainSpec, EvalRunSpec, FollowUpEvalSpec, *Section.__subclasses__()):
        props = schema["$defs"].get(model.__name__, {}).get("properties", {})
        for name, field in model.model_fields.items():  # pydantic drops descriptions beside a $ref with a default
            if field.description and name in props:
                props[name].setdefault("description", field.description)
    return schema
