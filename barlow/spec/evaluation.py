"""eval.*: what an evaluation measures and how; a pretrain spec's follow-up eval, with its own nodes and pod
resources (unset: the pretraining's)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from barlow.spec.base import READABLE_SCHEMES, Quantity, Section, _check_url
from barlow.spec.cluster import MULTUS_NETWORKS, ClusterSpec
from barlow.spec.data import LabelledDataSpec
from barlow.spec.plugins import EVAL_PROTOCOLS
from barlow.spec.sections import RuntimeSpec


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

    def protocol_problems(self) -> list[tuple[str, str]]:
        # eval mode linear's rule (barlow.evaluate.linear): its backbone is frozen
        if self.mode == "linear" and self.lr_backbone > 0:
            return [("eval.lr_backbone", "must be 0 in linear mode (the backbone is frozen)")]
        return []


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
