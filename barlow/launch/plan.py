"""`barlow plan SPEC`: what a run will do before anything is submitted, for each of its stages (a pretrain spec's
pretraining and the eval its pipeline runs next): processes and GPUs, global batch, steps per epoch, total steps, and
the expected wall time and GPU-hours from the measured-throughput table. It always answers: what it cannot know (the
images of an index it cannot read, a throughput nobody measured) it says is unknown, and why. No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from barlow.goodput import SNAPSHOT_BYTES_PER_S, UPLOAD_BYTES_PER_S, young_daly_s
from barlow.launch.throughput import lookup
from barlow.spec import EvalRunSpec, PretrainSpec, RunSpec, SpecError, stage_runs

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
    """Training images, counted from a shard index (one small read) or an image folder's listing (kept, or listed)."""
    return describe_data(spec).images


def describe_data(spec: PretrainSpec | EvalRunSpec):  # -> barlow.data.DataSummary
    from barlow.data import summarize

    return summarize(spec.data, "train")


def _has_s3_credentials() -> bool:
    # the chain s3fs reads (environment, shared files, instance metadata), asked once a read was refused
    import botocore.session

    return botocore.session.get_session().get_credentials() is not None


def count_images(spec: PretrainSpec | EvalRunSpec, given: int | None = None) -> tuple[int | None, str, str]:
    """(training images, why unknown, what the data is): `given` (--images), else counted from the shard index or
    the folder's listing; never raises."""
    url = spec.data.train
    if given is not None:
        return given, "", "given by --images"
    what = "the shard index" if spec.data.format == "shards" else "the image folder"
    try:
        summary = describe_data(spec)
        return summary.images, "", summary.text
    except ImportError as e:  # the CLI image has no data stack
        why = f"reading {url} needs {e.name or 'the data stack'}, which this installation lacks: pass --images N"
    except PermissionError as e:
        why = f"no credentials for {url}" if url.startswith("s3://") and not _has_s3_credentials() else f"{e}: pass --images N"
    except Exception as e:  # noqa: BLE001 - plan always answers: what it cannot read it says it cannot
        why = f"cannot read {what} ({type(e).__name__}: {e}): pass --images N"
    return None, why, "unknown"


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


def lines(spec: PretrainSpec | EvalRunSpec, plan: Plan, unknown: str = "pass --images N") -> list[tuple[str, str]]:
    """(label, value) rows of one stage; `unknown` says why its images are not known."""
    r, c = spec.runtime, spec.cluster
    measured = f"{plan.images_per_s_per_gpu:g} images/s per GPU ({plan.measured_by})" if plan.images_per_s_per_gpu else (
        f"not measured for ({plan.gpu_model or 'GPU model unknown: pass --gpu'}, {spec.model.arch}, "
        f"{spec.data.image_size} px): see barlow/launch/throughput.py")
    if isinstance(spec, EvalRunSpec):
        measured = "not measured (barlow/launch/throughput.py holds pretraining rows)"
    if isinstance(spec, EvalRunSpec) and spec.eval.train_percent != 100:
        images = f"{plan.images} ({spec.eval.train_percent} % of the labelled images)"
    else:
        images = f"{plan.images}"
    return [
        ("run", f"{spec.name} ({spec.kind}; on a cluster: {c.backend} in namespace {c.namespace})"),
        ("processes", f"{r.nodes} node(s) × {r.nproc_per_node} = {r.world_size}"),
        ("GPUs", f"{plan.gpus}" + (f" × {plan.gpu_model}" if plan.gpu_model and plan.gpus else "")),
        ("global batch", f"{plan.global_batch} ({plan.global_batch // r.world_size} per process)"),
        ("images", images if plan.images is not None else f"unknown ({unknown})"),
        ("steps/epoch", f"{plan.steps_per_epoch}" if plan.steps_per_epoch is not None else "unknown"),
        ("total steps", f"{plan.total_steps} ({plan.epochs} epochs)" if plan.total_steps is not None else "unknown"),
        ("throughput", measured),
        ("wall time", f"{plan.wall_hours:.1f} h" if plan.wall_hours is not None else "not measured"),
        ("GPU-hours", f"{plan.gpu_hours:.0f}" if plan.gpu_hours is not None else "not measured"),
    ]


# Parameters of torchvision's ResNets without their classifier, at width 64 (they scale with width squared)
BACKBONE_PARAMS = {"resnet18": 11_176_512, "resnet34": 21_284_672, "resnet50": 23_508_032, "resnet101": 42_500_160,
                   "resnet152": 58_143_808}
FEATURE_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
FAR_OFF = 3.0  # output.checkpoint_every more than this factor from the interval gets a warning


def state_bytes(spec: PretrainSpec) -> int:
    """A pretrain checkpoint's size, estimated: weights and LARS momentum (float32) of backbone and projector, the
    BatchNorm statistics, and the checkpoint's backbone.pt."""
    m = spec.model
    scale = (m.width / 64) ** 2
    backbone = int(BACKBONE_PARAMS[m.arch] * scale)
    sizes = [FEATURE_DIM[m.arch] * m.width // 64, *(int(x) for x in m.projector.split("-"))]
    projector = sum(a * b for a, b in zip(sizes, sizes[1:], strict=False)) + 4 * sum(sizes[1:-1])
    return 4 * (2 * (backbone + projector) + backbone)


@dataclass(frozen=True)
class CheckpointInterval:
    """Young/Daly's checkpoint interval, sqrt(2 x save stall x the job's MTBF), never shorter than one upload (one
    is in flight at a time), and what it costs."""

    state_bytes: int
    stall_s: float  # training stands still this long per checkpoint (the snapshot; the upload runs behind)
    upload_s: float
    mtbf_s: float  # the job's: a node's, divided by the nodes
    step_s: float | None  # seconds per step (None: throughput not measured)

    @property
    def interval_s(self) -> float:
        return young_daly_s(self.stall_s, self.mtbf_s, self.upload_s)

    @property
    def steps(self) -> int | None:
        return None if not self.step_s else max(1, round(self.interval_s / self.step_s))

    @property
    def overhead(self) -> float:
        """Expected share of the wall time lost to checkpoint stalls and to work redone after failures."""
        return self.stall_s / self.interval_s + self.interval_s / 2 / self.mtbf_s


def checkpoint_interval(spec: PretrainSpec, plan: Plan) -> CheckpointInterval:
    size = state_bytes(spec)
    step_s = plan.global_batch / (plan.images_per_s_per_gpu * plan.gpus) if plan.images_per_s_per_gpu and plan.gpus else None
    return CheckpointInterval(size, size / SNAPSHOT_BYTES_PER_S, size / UPLOAD_BYTES_PER_S,
                              spec.cluster.node_mtbf_hours * 3600 / spec.runtime.nodes, step_s)


def _seconds(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 60 else f"{s:.1f} s"


def checkpoint_lines(spec: PretrainSpec, plan: Plan) -> list[tuple[str, str]]:
    """The checkpoint interval rows, and a warning when output.checkpoint_every is far from it."""
    ci = checkpoint_interval(spec, plan)
    every = spec.output.checkpoint_every
    steps = f"{ci.steps} steps, " if ci.steps else ""
    rows = [("checkpoint", f"about {ci.state_bytes / 1e9:.2f} GB: stall {ci.stall_s:.2f} s (snapshot at "
                           f"{SNAPSHOT_BYTES_PER_S / 1e9:g} GB/s), upload {_seconds(ci.upload_s)} in the background (at "
                           f"{UPLOAD_BYTES_PER_S / 1e6:g} MB/s)"),
            ("failures", f"one every {_seconds(ci.mtbf_s)} ({spec.runtime.nodes} node(s), cluster.node_mtbf_hours "
                         f"{spec.cluster.node_mtbf_hours:g})"),
            ("interval", f"{steps}{_seconds(ci.interval_s)} (Young/Daly: sqrt(2 x stall x MTBF)); expected overhead "
                         f"{100 * ci.overhead:.2f} %, work lost per failure about {_seconds(ci.interval_s / 2)}")]
    if every == "auto":
        rows.append(("auto", "output.checkpoint_every auto: the run works this out at its first log step from its own "
                         "step time and state"))
    elif ci.steps and not (ci.steps / FAR_OFF <= every <= ci.steps * FAR_OFF):
        at = ci.stall_s / (every * ci.step_s) + every * ci.step_s / 2 / ci.mtbf_s
        rows.append(("warning", f"output.checkpoint_every {every} is far from {ci.steps} (expected overhead "
                                f"{100 * at:.2f} % instead of {100 * ci.overhead:.2f} %)"))
    return rows


def stages(spec: PretrainSpec | EvalRunSpec) -> tuple[list[tuple[str, RunSpec]], list[str]]:
    """The stages `barlow plan` shows, titled, and the problems of a pipeline's eval that cannot run (its pretraining
    is still shown): an eval spec is one eval; a pretrain spec is its pretraining and its pipeline's eval."""
    if isinstance(spec, EvalRunSpec):
        return [("eval", spec)], []
    try:
        _, ev = stage_runs(spec, "pipeline")
    except SpecError as e:
        return [("pretrain", spec)], e.problems
    return [("pretrain", spec), (f"eval (the pipeline's, after pretrain: {ev.name})", ev)], []


def report(spec: PretrainSpec | EvalRunSpec, images: int | None = None, gpu: str | None = None) -> list[str]:
    """What `barlow plan` prints: each stage's rows under its title; never raises on what it cannot know."""
    counted = {spec.data.train: count_images(spec, images)}
    runs, problems = stages(spec)
    out = []
    for title, run in runs:
        if run.data.train not in counted:  # an eval of other data (eval.data)
            counted[run.data.train] = count_images(run)
        count, unknown, what = counted[run.data.train]
        out.append(f"{title}:")
        plan = make_plan(run, count, gpu)
        rows = [("data", what), *lines(run, plan, unknown)] + (checkpoint_lines(run, plan) if isinstance(run, PretrainSpec) else [])
        out += [f"  {label + ':':<14}{value}" for label, value in rows]
    out += [f"eval (the pipeline's): cannot run: {p}" for p in problems]
    return out
