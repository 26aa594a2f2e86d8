"""What pretraining and evaluation both need before their first step, and the rules both follow while they run.

`start(spec)` joins the process group and picks the device, builds the S3 settings once from the spec (every storage
call of the run, data, checkpoints and metrics, gets them explicitly), seeds the generators and sets the numerics.
`wrap_ddp`, `agreed_stop` and `RunRecord` are the rest of the shared scaffolding: DDP wrapping, the stop signal all
ranks act on at the same step, and the "same run?" check of a resume.
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

from barlow import distributed, storage
from barlow.errors import OutputHoldsAnotherRun
from barlow.spec import RunSpec

STOP_SIGNAL = signal.SIGTERM  # what ranks without a signal of their own stop with when another rank got one

StopSignal = Callable[[], "int | None"]  # the first stop signal this process received, or None


@dataclass(frozen=True)
class Process:
    """This process's place in the run, the run's S3 settings, and its numerics."""

    place: distributed.Placement
    s3: storage.S3Settings

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast where the placement chose it, else a no-op."""
        dtype = self.place.autocast_dtype
        return torch.autocast(self.place.device.type, dtype=dtype) if dtype else nullcontext()

    @property
    def channels_last(self) -> bool:
        """Convolutions under bf16 autocast run fastest on NHWC tensors; fp32 keeps the default layout."""
        return self.place.autocast_dtype is not None


def to_device(proc: Process, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on the device: asynchronous from pinned memory (the host allocator keeps a pinned block until its
    copy is done), in the layout the backbone runs fastest on."""
    layout = torch.channels_last if proc.channels_last else torch.preserve_format
    device = proc.place.device
    return x.to(device, non_blocking=True, memory_format=layout), y.to(device, non_blocking=True)


def start(spec: RunSpec) -> Process:
    """Join the process group, pick the device, build the S3 settings, seed, and set the numerics."""
    place = distributed.setup(spec.runtime)
    torch.manual_seed(spec.runtime.seed)
    if place.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels once
    return Process(place, storage.S3Settings.of_spec(spec))


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
