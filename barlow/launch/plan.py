"""`barlow plan SPEC`: what a run will do before anything is submitted: processes and GPUs, global batch, steps per
epoch, total steps, and the expected wall time and GPU-hours from the measured-throughput table. No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from barlow.launch.throughput import lookup
from barlow.spec import EvalRunSpec, PretrainSpec

GPU_LABEL = "nvidia.com/gpu.product"


@dataclass(frozen=True)
class Plan:
    processes: int
    gpus: int
    global_batch: int
    epochs: int
    images: int | None  # training images per epoch (None: unknown)
    gpu_model: str | None
    images_per_s_per_gpu: float | None  # measured (None: not measured)
    measured_by: str = ""

    @property
    def steps_per_epoch(self) -> int | None:
        return None if self.images is None else self.images // self.global_batch

    @property
    def total_steps(self) -> int | None:
        return None if self.steps_per_epoch is None else self.steps_per_epoch * self.epochs

    @property
    def wall_hours(self) -> float | None:
        if self.total_steps is None or not self.images_per_s_per_gpu or not self.gpus:
            return None
        return self.total_steps * self.global_batch / (self.images_per_s_per_gpu * self.gpus) / 3600

    @property
    def gpu_hours(self) -> float | None:
        return None if self.wall_hours is None else self.wall_hours * self.gpus


def images_in(spec: PretrainSpec | EvalRunSpec) -> int | None:
    """Training images, from a shard index (one small read); None for an image folder (pass --images)."""
    if spec.data.format != "shards":
        return None
    from barlow import storage
    from barlow.data.layout import load_index

    index = load_index(spec.data.train, storage.S3Settings(**spec.data.s3.model_dump()))
    return sum(s.samples for s in index.shards)


def make_plan(spec: PretrainSpec | EvalRunSpec, images: int | None, gpu: str | None = None) -> Plan:
    r, c = spec.runtime, spec.cluster
    gpus = r.nodes * c.gpus_per_node if c.gpus_per_node else (r.world_size if r.device == "cuda" else 0)
    if isinstance(spec, PretrainSpec):
        batch, epochs = spec.optim.batch_size, spec.optim.epochs
    else:
        batch, epochs = spec.eval.batch_size, spec.eval.epochs
        images = None if images is None else images * spec.eval.train_percent // 100
    model = gpu or c.node_selector.get(GPU_LABEL)
    row = lookup(model, spec.model.arch, spec.data.image_size) if isinstance(spec, PretrainSpec) else None
    return Plan(r.world_size, gpus, batch, epochs, images, model, row.images_per_s_per_gpu if row else None,
                row.source if row else "")


def lines(spec: PretrainSpec | EvalRunSpec, plan: Plan) -> list[tuple[str, str]]:
    """(label, value) rows that `barlow plan` prints."""
    r, c = spec.runtime, spec.cluster
    unknown = "unknown: pass --images N (an image folder is not counted)"
    measured = f"{plan.images_per_s_per_gpu:g} images/s per GPU ({plan.measured_by})" if plan.images_per_s_per_gpu else (
        f"not measured for ({plan.gpu_model or 'GPU model unknown: pass --gpu'}, {spec.model.arch}, "
        f"{spec.data.image_size} px): see barlow/launch/throughput.py")
    return [
        ("run", f"{spec.name} ({spec.kind}; on a cluster: {c.backend} in namespace {c.namespace})"),
        ("processes", f"{r.nodes} node(s) × {r.nproc_per_node} = {r.world_size}"),
        ("GPUs", f"{plan.gpus}" + (f" × {plan.gpu_model}" if plan.gpu_model and plan.gpus else "")),
        ("global batch", f"{plan.global_batch} ({plan.global_batch // r.world_size} per process)"),
        ("images", f"{plan.images}" if plan.images is not None else unknown),
        ("steps/epoch", f"{plan.steps_per_epoch}" if plan.steps_per_epoch is not None else "unknown"),
        ("total steps", f"{plan.total_steps} ({plan.epochs} epochs)" if plan.total_steps is not None else "unknown"),
        ("throughput", measured),
        ("wall time", f"{plan.wall_hours:.1f} h" if plan.wall_hours is not None else "not measured"),
        ("GPU-hours", f"{plan.gpu_hours:.0f}" if plan.gpu_hours is not None else "not measured"),
    ]
