"""The run specs: the fields every run has and its cross-field rules, a pretraining (optionally followed by an eval) and
an evaluation; `AnySpec` tells them apart by `kind`."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from barlow.spec.base import Section
from barlow.spec.cluster import DNS_1035, ClusterSpec, _cluster_problems
from barlow.spec.data import DataSpec
from barlow.spec.evaluation import EvalSpec, FollowUpEvalSpec
from barlow.spec.sections import ModelSpec, MonitorSpec, OptimSpec, OutputSpec, RuntimeSpec


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
        problems += self.data.format_problems()
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
        problems += self.monitor.knn_problems(has_val=self.data.val is not None)
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
            "output": {"url": f"{self.output.url}/eval", "keep": self.output.keep, "mlflow": self.output.mlflow},
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
        problems += e.protocol_problems()
        return problems


AnySpec = Annotated[PretrainSpec | EvalRunSpec, Field(discriminator="kind")]
