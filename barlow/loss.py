"""The Barlow Twins loss over the global batch, with a direct (D x D) and a lean (N x N) exact path.

loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2, with C = z1n^T z2n / N, where each view is normalised
per dimension with the (global) batch mean and biased variance (eps 1e-5, no affine), as BatchNorm1d does.

Distributed convention (torch.distributed initialised with world_size W > 1): every rank returns the loss of the
GLOBAL batch (same value on every rank), and the gradient w.r.t. its local z1/z2 is W times the matching slice of the
single-process gradient on the concatenated batch, so DDP's mean of parameter gradients over ranks is exactly the
single-process gradient. (All collectives are differentiable sums whose backward sums the ranks' gradients; every
rank's loss is the same function of all inputs, so the local gradient is that of W * loss.) Every rank must hold the
same number of samples (DistributedSampler with drop_last gives that).

Imports nothing of barlow.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

EPS = 1e-5
PATHS = ("auto", "direct", "lean")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _waited(x: torch.Tensor) -> torch.Tensor:
    # A plain tensor, not funcol's lazy AsyncCollectiveTensor (which would leak into metrics and torch.save).
    return x.wait() if isinstance(x, funcol.AsyncCollectiveTensor) else x


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; backward sums the ranks' gradients. (torch.distributed.nn.functional's is deprecated here.)"""
    return _waited(funcol.all_reduce(x, "sum", dist.group.WORLD)) if _world_size() > 1 else x


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x along dim 0; backward sums the ranks' gradients of this rank's slice."""
    return _waited(funcol.all_gather_single(x.contiguous(), 0, dist.group.WORLD)) if _world_size() > 1 else x


def _as_float(z: torch.Tensor) -> torch.Tensor:
    # At least float32 (bf16/fp16 activations are upcast); float64 stays float64 for exact tests.
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _check(z1: torch.Tensor, z2: torch.Tensor) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1, z2: need two [batch, dim] tensors of the same shape (got {tuple(z1.shape)} and {tuple(z2.shape)})")
    if z1.shape[0] * _world_size() < 2:
        raise ValueError(f"z1, z2: the global batch needs at least 2 samples to normalise (got {z1.shape[0] * _world_size()})")


def _normalize_local(z: torch.Tensor) -> torch.Tensor:
    """BatchNorm1d(affine=False) in training mode over the rows held here."""
    zc = z - z.mean(0)
    return zc * torch.rsqrt(zc.pow(2).mean(0) + EPS)


def _normalize_global(z: torch.Tensor, n: int) -> torch.Tensor:
    """Normalise the local rows with the mean and biased variance of the global batch of n rows."""
    zc = z - _all_reduce_sum(z.sum(0)) / n
    return zc * torch.rsqrt(_all_reduce_sum(zc.pow(2).sum(0)) / n + EPS)


def _off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix as a flat view (the official code's trick)."""
    d = c.shape[0]
    return c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def _direct_c(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """C (D x D) of the global batch: local z1n^T z2n summed over ranks."""
    n = z1.shape[0] * _world_size()
    return _all_reduce_sum(_normalize_global(z1, n).T @ _normalize_global(z2, n) / n)


def _direct(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = _direct_c(z1, z2)
    return (1 - torch.diagonal(c)).pow(2).sum(), _off_diagonal(c).pow(2).sum()


class _SquaredCrossNorm(torch.autograd.Function):
    """||z1^T z2||_F^2 = sum (z1 z1^T) * (z2 z2^T) from N x N Gram matrices.

    Backward uses the Grams' symmetry: d/dz1 = 2 (z2 z2^T) z1, one matmul per input where autograd would do two.
    """

    @staticmethod
    def forward(ctx, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        g1, g2 = z1 @ z1.T, z2 @ z2.T
        ctx.save_for_backward(z1, z2, g1, g2)
        return (g1 * g2).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z1, z2, g1, g2 = ctx.saved_tensors
        return (g2 * (2 * grad)) @ z1, (g1 * (2 * grad)) @ z2


def _lean(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same terms without the D x D matrix: sum_ij C_ij^2 = sum (Z1 Z1^T) * (Z2 Z2^T) / N^2 over the global batch."""
    z1n, z2n = _normalize_local(_all_gather(z1)), _normalize_local(_all_gather(z2))
    n = z1n.shape[0]
    diag = (z1n * z2n).sum(0) / n
    all_sq = _SquaredCrossNorm.apply(z1n, z2n) / (n * n)
    return (1 - diag).pow(2).sum(), all_sq - diag.pow(2).sum()


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss of the global batch (see the module docstring for the distributed gradient convention).

    path: "direct" forms C (D x D); "lean" works with N x N Gram matrices; "auto" picks lean when global N < D.
    After each forward, `on_diag` and `off_diag` hold the two (unweighted) terms as detached float tensors.
    """

    def __init__(self, lambd: float = 5e-3, path: str = "auto"):
        super().__init__()
        if path not in PATHS:
            raise ValueError(f"path: must be one of {', '.join(PATHS)} (got '{path}')")
        if lambd < 0:
            raise ValueError(f"lambd: must be >= 0 (got {lambd})")
        self.lambd = lambd
        self.path = path
        self.on_diag: torch.Tensor | None = None
        self.off_diag: torch.Tensor | None = None

    def chosen_path(self, n_local: int, dim: int) -> str:
        """The path forward() takes for a local batch of n_local rows of width dim."""
        if self.path != "auto":
            return self.path
        return "lean" if n_local * _world_size() < dim else "direct"

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        _check(z1, z2)
        with torch.autocast(device_type=z1.device.type, enabled=False):  # bf16 matmuls would wreck C's precision
            z1, z2 = _as_float(z1), _as_float(z2)
            terms = _lean if self.chosen_path(*z1.shape) == "lean" else _direct
            on_diag, off_diag = terms(z1, z2)
            self.on_diag, self.off_diag = on_diag.detach().float(), off_diag.detach().float()
            return on_diag + self.lambd * off_diag

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}, path={self.path}"


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """C (D x D, float32) of the global batch, without gradient (for the heatmap)."""
    _check(z1, z2)
    with torch.no_grad(), torch.autocast(device_type=z1.device.type, enabled=False):
        return _direct_c(z1.float(), z2.float())
