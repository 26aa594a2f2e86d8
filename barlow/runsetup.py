"""The run skeleton pretraining and evaluation share: how a run opens, the context its steps run in, and how it stops.

`start(spec)` joins the process group and picks the device, builds the S3 settings once from the spec (every storage
call of the run, data, checkpoints and metrics, gets them explicitly), seeds the generators and sets the numerics;
it returns the `RunContext`. Once a loop has built its parts (model, optimizer, data position), `open_run(...)`
resumes them from the latest complete checkpoint that matches the `RunRecord`, opens the metrics with the trackers
(MLflow where `output.mlflow` is set) and writes `run.json` for `barlow status`; it returns the `RunHandle` the
loop's own run extends. `stop_point(...)` is the stop protocol both loops follow: agreed on by every rank at the same
step, then a checkpoint, a sync, the metrics closed as KILLED, and StoppedOnSignal. `wrap_ddp` is the DDP wrapping.
"""

from __future__ import annotations

import inspect
import signal
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from barlow import distributed, storage, tracking
from barlow.augment import to_device
from barlow.checkpoint import Checkpointer, Stateful
from barlow.errors import OutputHoldsAnotherRun, StoppedOnSignal
from barlow.metrics import Metrics
from barlow.spec import RunSpec
from barlow.status import runfiles

STOP_SIGNAL = signal.SIGTERM  # what ranks without a signal of their own stop with when another rank got one
# The layout of models and image batches, in pretraining and eval alike: NHWC convolutions run fastest under bf16
# and, on the CPU, in float32 too (about 15 %, bench/train.py); the feed's views are channels-last, so DDP's bucket
# views then have the gradients' strides.
LAYOUT = torch.channels_last

StopSignal = Callable[[], "int | None"]  # the first stop signal this process received, or None


@dataclass(frozen=True)
class RunContext:
    """This process's place in the run, the run's S3 settings, and its numerics."""

    place: distributed.Placement
    s3: storage.S3Settings

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast where the placement chose it, else a no-op."""
        dtype = self.place.autocast_dtype
        return torch.autocast(self.place.device.type, dtype=dtype) if dtype else nullcontext()

    def module_on_device(self, module: nn.Module) -> nn.Module:
        """`module` moved to the device, in LAYOUT."""
        return module.to(self.place.device, memory_format=LAYOUT)

    def batch_on_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels on the device, copied without a host sync (`barlow.augment.to_device`), the images in
        LAYOUT."""
        device = self.place.device
        return to_device(x, device).contiguous(memory_format=LAYOUT), to_device(y, device)


def start(spec: RunSpec) -> RunContext:
    """Join the process group, pick the device, build the S3 settings, seed, and set the numerics (a tracker's extra
    checked first, before anything is written)."""
    if spec.output.mlflow is not None:
        tracking.require_mlflow()
    place = distributed.setup(spec.runtime)
    torch.manual_seed(spec.runtime.seed)
    if place.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels once
    return RunContext(place, storage.S3Settings.of_spec(spec))


@dataclass
class RunHandle:
    """What both loops hold of a run, as `open_run` opens it: the process's placement, the S3 settings, the
    checkpointer (resumed) and the metrics (with the trackers). train.Run and evaluate.EvalRun extend it."""

    place: distributed.Placement
    s3: storage.S3Settings
    checkpointer: Checkpointer
    metrics: Metrics

    @property
    def ctx(self) -> RunContext:
        return RunContext(self.place, self.s3)

    def shared(self) -> dict[str, Any]:
        """These fields by name, to build the loop's own run from (`Run(**handle.shared(), ...)`)."""
        return {"place": self.place, "s3": self.s3, "checkpointer": self.checkpointer, "metrics": self.metrics}


def open_run(spec: RunSpec, ctx: RunContext, *, parts: dict[str, Stateful], record: RunRecord, total_steps: int,
             steps_per_epoch: int, batch_size: int, every: int | None, title: str,
             exports: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] | None = None,
             optional: tuple[str, ...] = (), monitor_keys: tuple[str, ...] = (),
             fits: Callable[[dict[str, Any], str], None] = lambda saved, url: None) -> RunHandle:
    """The parts resumed from the latest complete checkpoint (after `record.check` and `fits(saved record, url)`
    accept it), then the trackers, the metrics from the resumed step, and run.json (what `barlow status` reads).
    `every`, `exports`, `optional`: the Checkpointer's; `monitor_keys`: the monitors' keys, shown on the progress
    line and by `barlow status`."""
    place, s3, out = ctx.place, ctx.s3, spec.output.url
    checkpointer = Checkpointer(out, every=every, keep=spec.output.keep, is_main=place.is_main, run=record.as_dict(),
                                s3=s3, parts=parts, exports=exports, optional=optional)

    def check(saved: dict[str, Any], url: str) -> None:
        record.check(saved, url)
        fits(saved, url)

    step = checkpointer.resume(check)
    tracker = None
    if spec.output.mlflow is not None and place.is_main:
        tracker = tracking.MlflowTracker(spec.output.mlflow.tracking_uri, spec.output.mlflow.experiment, spec.name,
                                         out, tracking.flatten(spec.model_dump(mode="json")))
    metrics = Metrics(out, place.is_main, total_steps, step, title=title, s3=s3, tracker=tracker,
                      progress_keys=monitor_keys)
    if place.is_main:
        runfiles.record_run(spec, total_steps, steps_per_epoch, batch_size, s3, monitor_keys=monitor_keys)
    return RunHandle(place, s3, checkpointer, metrics)


def stop_point(run: RunHandle, stop_signal: StopSignal, step: int, where: str, *, saved: bool = False) -> None:
    """Where any rank got a stop signal: checkpoint `step` and sync the metrics (unless `saved`: just done), wait for
    the checkpoint's upload, close the metrics as KILLED (to be resumed) and raise StoppedOnSignal naming `where`. A
    collective: every rank calls it at the same step."""
    signum = agreed_stop(stop_signal, run.place)
    if signum is None:
        return
    if not saved:
        run.checkpointer.save(step)
        run.metrics.sync()
    run.checkpointer.wait()  # the upload done on the main rank, every rank held until then
    run.metrics.stopped(step, signum)
    run.metrics.close("KILLED")
    raise StoppedOnSignal(signum, where)


def wrap_ddp(module: nn.Module, place: distributed.Placement) -> nn.Module:
    """DDP across processes (the module itself for one): gradients are views of DDP's buckets (no copies), and
    `static_graph` because every step uses every parameter. Buffers are re-broadcast every step only where some are
    rank-local (plain BatchNorm): SyncBatchNorm's running statistics are the global batch's on every rank already."""
    if place.world_size == 1:
        return module
    return DistributedDataParallel(module, gradient_as_bucket_view=True, static_graph=True,
                                   **ddp_buffer_sync(rank_local_buffers(module)))


def rank_local_buffers(module: nn.Module) -> bool:
    """Whether some buffers differ between ranks after a step: plain BatchNorm's running statistics (SyncBatchNorm's
    are the global batch's on every rank)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
               for m in module.modules())


def ddp_buffer_sync(every_step: bool) -> dict[str, bool]:
    """DDP's keyword for broadcasting buffers before every forward: `forward_sync_buffers` where torch has it (2.14
    deprecates `broadcast_buffers` with a FutureWarning), `broadcast_buffers` before. Either way rank 0's buffers
    are where a rank starts from."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": every_step}
    return {"broadcast_buffers": every_step}


def agreed_stop(stop_signal: StopSignal, place: distributed.Placement) -> int | None:
    """The signal every rank stops on, or None: a collective (call it on all ranks at the same step); a rank that got
    no signal itself takes STOP_SIGNAL."""
    signum = stop_signal()
    if place.world_size == 1:
        return signum
    if distributed.any_rank(signum is not None, place.device):
        return signum or STOP_SIGNAL
    return None


@dataclass(frozen=True)
class RunRecord:
    """What a checkpoint records about its run: `fixed`, what a resume must share (else the output folder holds
    another run), and `noted`, what may change on a resume but is named when it does (it changes the data order).
    `fields` names a key's spec field where the two differ (`batch_size` is `optim.batch_size`)."""

    fixed: dict[str, Any]
    noted: dict[str, Any]
    what: str = "a run"
    fields: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {**self.fixed, **self.noted}

    def check(self, saved: dict[str, Any], url: str) -> None:
        """Raise OutputHoldsAnotherRun naming each spec field that differs from the checkpoint at `url`."""
        differ = [d for k, v in self.fixed.items() for d in _differences(self.fields.get(k, k), saved.get(k), v)]
        if differ:
            raise OutputHoldsAnotherRun(f"output.url: {url} holds {self.what} with other settings "
                                        f"({'; '.join(differ)}); use a new output.url")

    def changes(self, saved: dict[str, Any]) -> list[str]:
        """The noted fields a resume changes, as `name saved -> now`."""
        return [f"{k} {saved[k]} -> {v}" for k, v in self.noted.items() if k in saved and saved[k] != v]


def _differences(name: str, saved: Any, now: Any) -> list[str]:
    """`name saved -> now` for a value, or for each differing key of a section (`model.arch resnet50 -> resnet18`)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [f"{name}.{k} {saved.get(k)} -> {now.get(k)}" for k in {**saved, **now} if saved.get(k) != now.get(k)]
    return [] if saved == now else [f"{name} {'(not recorded)' if saved is None else saved} -> {now}"]
