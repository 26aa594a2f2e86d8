"""The Barlow Twins loss over the global batch: direct (D x D), lean (N x N) and feature-sharded exact paths.

loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2, with C = z1n^T z2n / N, where each view is normalised
per dimension with the (global) batch mean and biased variance (eps 1e-5, no affine), as BatchNorm1d does.

Distributed convention (torch.distributed initialised with world_size W > 1): every rank returns the loss of the
GLOBAL batch (same value on every rank), and the gradient w.r.t. its local z1/z2 is W times the matching slice of the
single-process gradient on the concatenated batch, so DDP's mean of parameter gradients over ranks is exactly the
single-process gradient. (All collectives are differentiable sums whose backward sums the ranks' gradients; every
rank's loss is the same function of all inputs, so the local gradient is that of W * loss.) Every rank must hold the
same number of samples (DistributedSampler with drop_last gives that).

The paths (all exact; they differ in memory, compute and bytes sent, see `bytes_sent`):
- direct: C summed over ranks with one all-reduce of D x D (the official code's way).
- lean: ||C||_F^2 = sum (Z1 Z1^T) * (Z2 Z2^T) / N^2 from N x N Gram matrices; every rank all-gathers both views
  (N x D each) and computes the loss of the whole batch.
- sharded: one all-to-all gives each rank all N rows of its D / W features, so the per-feature normalisation and
  the diagonal term are local and exact; the Frobenius term sums the ranks' N x N Gram matrices (Z Z^T is a sum over
  feature slices) with one all-reduce of both Grams' upper triangles (they are symmetric). W must divide D;
  otherwise the lean path runs.
Where a collective's result feeds only a computation every rank repeats identically (C in direct, the gathered
views in lean, the summed Grams in sharded), every rank's gradient of that result is the same, so its backward is
W x the gradient (or W x this rank's slice of it) with no traffic instead of a second collective.

Imports nothing of barlow.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

EPS = 1e-5
PATHS = ("auto", "direct", "lean", "sharded")


# torch >= 2.14 names it all_gather_single (and deprecates all_gather_tensor); torch 2.11 has only all_gather_tensor.
_all_gather_single = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _waited(x: torch.Tensor) -> torch.Tensor:
    # A plain tensor, not funcol's lazy AsyncCollectiveTensor (which would leak into metrics and torch.save).
    return x.wait() if isinstance(x, funcol.AsyncCollectiveTensor) else x


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; backward sums the ranks' gradients. (torch.distributed.nn.functional's is deprecated here.)"""
    return _waited(funcol.all_reduce(x, "sum", dist.group.WORLD)) if _world_size() > 1 else x


class _ReplicatedSum(torch.autograd.Function):
    """Sum over ranks of a tensor whose sum feeds a computation every rank repeats identically.

    Every rank's gradient of the sum is then the same, so the summed gradient (the backward of a differentiable
    all-reduce) is W x the local one: no second all-reduce.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _waited(funcol.all_reduce(x, "sum", dist.group.WORLD))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * _world_size()


class _ReplicatedGather(torch.autograd.Function):
    """Every rank's x concatenated along dim 0, feeding a computation every rank repeats identically.

    The backward of a differentiable all-gather reduce-scatters the ranks' gradients; here they are all equal, so
    this rank's share is W x its own slice: no traffic.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return _waited(_all_gather_single(x.contiguous(), 0, dist.group.WORLD))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank = dist.get_rank()
        return grad[rank * ctx.rows:(rank + 1) * ctx.rows] * _world_size()


def _replicated_sum(x: torch.Tensor) -> torch.Tensor:
    return _ReplicatedSum.apply(x) if _world_size() > 1 else x


def _replicated_gather(x: torch.Tensor) -> torch.Tensor:
    return _ReplicatedGather.apply(x) if _world_size() > 1 else x


def _feature_shards(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views' local [n, D] rows -> each [W n, D / W]: every rank's rows (rank order) of this rank's features.

    One all-to-all for both views; its backward (an all-to-all of the gradients) returns each rank its rows.
    """
    w = _world_size()
    if w == 1:
        return z1, z2
    n, d = z1.shape
    # [2, n, W, D/W] -> [W, 2, n, D/W]: the block for rank r holds feature slice r of both views.
    send = torch.stack((z1, z2)).view(2, n, w, d // w).permute(2, 0, 1, 3).reshape(w * 2 * n, d // w)
    got = _waited(funcol.all_to_all_single(send, None, None, dist.group.WORLD))
    both = got.view(w, 2, n, d // w).transpose(0, 1).reshape(2, w * n, d // w)
    return both[0], both[1]


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
    return _replicated_sum(_normalize_global(z1, n).T @ _normalize_global(z2, n) / n)


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
    both = _replicated_gather(torch.cat((z1, z2), 1))  # one all-gather for both views
    z1n, z2n = (_normalize_local(z) for z in both.split(z1.shape[1], 1))
    n = z1n.shape[0]
    diag = (z1n * z2n).sum(0) / n
    all_sq = _SquaredCrossNorm.apply(z1n, z2n) / (n * n)
    return (1 - diag).pow(2).sum(), all_sq - diag.pow(2).sum()


class _Gram(torch.autograd.Function):
    """z z^T; backward (g + g^T) z, one matmul where autograd would do two."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return z @ z.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return (grad + grad.T) @ z


@functools.lru_cache(maxsize=8)
def _strict_upper(n: int, device: torch.device) -> torch.Tensor:
    """Flat indices of the entries above the diagonal of an n x n matrix."""
    i, j = torch.triu_indices(n, n, 1, device=device)
    return i * n + j


def _sharded(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lean terms with the features split over ranks: local normalisation and diagonal, summed Grams."""
    s1, s2 = _feature_shards(z1, z2)
    z1n, z2n = _normalize_local(s1), _normalize_local(s2)
    n = z1n.shape[0]
    diag = (z1n * z2n).sum(0) / n  # this rank's D / W diagonal entries of C
    g1, g2 = _Gram.apply(z1n), _Gram.apply(z2n)
    up = _strict_upper(n, z1n.device)
    # One all-reduce: both Grams' strict upper triangles and diagonals, and this rank's two diagonal sums.
    total = _replicated_sum(torch.cat((g1.flatten()[up], g2.flatten()[up], g1.diagonal(), g2.diagonal(),
                                       (1 - diag).pow(2).sum()[None], diag.pow(2).sum()[None])))
    m = up.numel()
    u1, u2, d1, d2 = total[:m], total[m:2 * m], total[2 * m:2 * m + n], total[2 * m + n:2 * m + 2 * n]
    all_sq = (2 * (u1 * u2).sum() + (d1 * d2).sum()) / (n * n)  # sum (G1 * G2) of symmetric Grams
    return total[-2], all_sq - total[-1]


_TERMS = {"direct": _direct, "lean": _lean, "sharded": _sharded}


def bytes_sent(path: str, n: int, d: int, world: int, itemsize: int = 4) -> int:
    """Bytes one rank sends per step (forward + backward) in a path's collectives, global batch n, width d.

    Counted for bandwidth-optimal algorithms (ring all-reduce and all-gather, pairwise all-to-all, which NCCL uses at
    these sizes): all-reduce of k elements sends 2 (W-1)/W k, all-gather of a k-element result (W-1)/W k, all-to-all
    of k local elements (W-1)/W k. path "official" is the reference code's all-reduce of C alone (its SyncBatchNorm
    statistics, 2 x 2D floats per view, left out). "sharded" where W does not divide d counts the lean fallback.
    """
    w = world
    if w == 1:
        return 0
    reduce, gather = 2 * (w - 1) / w, (w - 1) / w
    if path == "official":
        elements = reduce * d * d
    elif path == "direct":  # C (backward local) + mean and variance of both views, forward and backward
        elements = reduce * d * d + 8 * reduce * d
    elif path == "lean" or (path == "sharded" and d % w):  # both views gathered (backward local)
        elements = 2 * gather * n * d
    elif path == "sharded":  # all-to-all of both local views, forward and backward, + the packed Grams (forward)
        elements = 2 * gather * 2 * (n // w) * d + reduce * (n * (n + 1) + 2)
    else:
        raise ValueError(f"path: must be one of official, direct, lean, sharded (got '{path}')")
    return round(elements * itemsize)


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss of the global batch (see the module docstring for the distributed gradient convention).

    path: "direct" forms C (D x D); "lean" works with N x N Gram matrices of the gathered views; "sharded" with the
    features split over ranks (lean where W does not divide D); "auto" (see chosen_path) picks by compute first,
    then by bytes sent. After each forward, `on_diag` and `off_diag` hold the two (unweighted) terms as detached
    float tensors.
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
        """The path forward() takes for a local batch of n_local rows of width dim on this world size.

        auto: direct when the global batch N >= D (C is the smaller matrix); otherwise an N x N path: on one process
        lean, on W > 1 whichever of lean and sharded sends fewer bytes (`bytes_sent`; sharded also splits the Gram
        work W ways, but at W = 2 it sends more than lean). sharded needs W | D and falls back to lean otherwise.
        """
        w = _world_size()
        n = n_local * w
        path = self.path
        if path == "auto":
            if n >= dim:
                return "direct"
            path = "sharded" if bytes_sent("sharded", n, dim, w) < bytes_sent("lean", n, dim, w) else "lean"
        return "lean" if path == "sharded" and dim % w else path

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        _check(z1, z2)
        with torch.autocast(device_type=z1.device.type, enabled=False):  # bf16 matmuls would wreck C's precision
            z1, z2 = _as_float(z1), _as_float(z2)
            on_diag, off_diag = _TERMS[self.chosen_path(*z1.shape)](z1, z2)
            self.on_diag, self.off_diag = on_diag.detach().float(), off_diag.detach().float()
            return on_diag + self.lambd * off_diag

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}, path={self.path}"


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """C (D x D, float32) of the global batch, without gradient (for the heatmap)."""
    _check(z1, z2)
    with torch.no_grad(), torch.autocast(device_type=z1.device.type, enabled=False):
        return _direct_c(z1.float(), z2.float())
