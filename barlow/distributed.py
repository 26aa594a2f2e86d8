"""The process's place in the run: rank and world from torchrun's environment, device, numerics, collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from barlow.errors import WrongPlacement
from barlow.spec import RuntimeSpec


@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(runtime: RuntimeSpec) -> Placement:
    """Join the process group torchrun (or the Kubeflow operator) describes in the environment."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world != runtime.world_size:
        raise WrongPlacement(f"runtime: the spec asks for {runtime.world_size} processes "
                           f"(nodes × nproc_per_node) but torchrun started {world}")
    use_cuda = runtime.device == "cuda" or (runtime.device == "auto" and torch.cuda.is_available())
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise WrongPlacement("runtime.device: cuda was asked for but no GPU is visible")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # A generous timeout: the other ranks wait in a barrier while rank 0 writes a checkpoint of gigabytes.
        # device_id binds NCCL's communicator to this GPU (no guessing, and collectives start at once).
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=runtime.collective_timeout_s),
                                device_id=device if use_cuda else None)
    return Placement(rank, world, local_rank, device, _autocast_dtype(runtime.precision, device))


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)  # compute capability >= 8 (Ampere on)
        computes = native or torch.cuda.is_bf16_supported(including_emulation=True)
    else:  # oneDNN runs bf16 fast only where the CPU has AVX-512 BF16 / AMX
        native = computes = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return choose_autocast_dtype(precision, device.type, native=native, computes=computes)


def choose_autocast_dtype(precision: str, device_type: str, *, native: bool, computes: bool) -> torch.dtype | None:
    """runtime.precision -> the autocast dtype. `native`: the device has bf16 arithmetic units; `computes`: it can
    run bf16 at all (emulated on V100 and T4, where bf16 is slower than fp32). auto takes bf16 only where native;
    an explicit bf16 is honoured wherever it computes."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if not computes:
            raise WrongPlacement(f"runtime.precision: bf16 is not supported on this {device_type}")
        return torch.bfloat16
    return torch.bfloat16 if native else None


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank says so (so all ranks stop at the same step)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())  # sync: every rank must agree before acting


def all_sum(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """Sum numbers (or 0-d tensors) over ranks."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()  # sync: the sums are read on the host


def row_counts(n: int, device: torch.device) -> list[int]:
    """Every rank's `n`, in rank order."""
    if not dist.is_initialized():
        return [n]
    mine = torch.tensor([n], device=device)
    counts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, mine)
    return [int(c) for c in torch.cat(counts).tolist()]  # sync: the counts size what follows


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
