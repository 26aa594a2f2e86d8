"""The sections every run has beside data and cluster (model, runtime, output with MLflow) and the pretraining's own
(optim, monitor)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import Field, TypeAdapter, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from barlow.spec.base import WRITABLE_SCHEMES, Section, _check_url
from barlow.spec.data import LabelledDataSpec
from barlow.spec.plugins import ARCHS


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

    def knn_problems(self, has_val: bool) -> list[tuple[str, str]]:
        # monitor knn's rule (barlow.monitors.knn): it measures on a labelled val set
        if self.knn_every_epochs and not has_val and self.data is None:
            return [("monitor.knn_every_epochs", "the kNN measures on data.val: set data.val (or monitor.data), "
                                                 "or 0 to turn it off")]
        return []

    def knn_every(self, has_val: bool) -> int:
        """Epochs between kNN measurements for this data (0: no kNN)."""
        if self.knn_every_epochs is None:
            return 10 if has_val else 0
        return self.knn_every_epochs
