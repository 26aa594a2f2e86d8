"""SyncBatchNorm without host syncs: batch statistics of the global batch, for barlow's steps.

torch's `SyncBatchNorm` drops the statistics of empty ranks with a boolean mask (`count_all[mask]`): a shape that
depends on device values, so a device-to-host sync in every forward of every layer (about 110 a ResNet-50 step with
two views). barlow's steps never have an empty rank (every rank gets batch_size / world_size samples, drop_last), so
this function gathers and combines every rank's statistics as they are, with torch's fused kernels on CUDA and
their plain-op equivalents elsewhere (so the same function runs on gloo ranks on the CPU, where torch's refuses).
Forward and backward are torch's otherwise (tests/runtime/test_syncbn.py; tests/runtime/test_two_ranks_one_device.py on CUDA).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import Function

# torch 2.14 deprecates all_gather_into_tensor for all_gather_single (a FutureWarning a call); 2.11 has only the former
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and 1 / sqrt(biased var + eps) (torch.batch_norm_stats)."""
    if x.is_cuda:
        return torch.batch_norm_stats(x, eps)
    dims = [d for d in range(x.ndim) if d != 1]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, torch.rsqrt(var + eps)


def _combine(x: torch.Tensor, mean_all: torch.Tensor, invstd_all: torch.Tensor, running_mean: torch.Tensor | None,
             running_var: torch.Tensor | None, momentum: float, eps: float,
             counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global mean and invstd from every rank's (torch.batch_norm_gather_stats_with_counts), running stats updated."""
    if x.is_cuda:
        return torch.batch_norm_gather_stats_with_counts(x, mean_all, invstd_all, running_mean, running_var, momentum,
                                                         eps, counts)
    n = counts.sum()
    w = (counts / n)[:, None]
    mean = (w * mean_all).sum(0)
    var = (w * (invstd_all.pow(-2) - eps + (mean_all - mean).pow(2))).sum(0)
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    if running_var is not None:
        running_var.mul_(1 - momentum).add_((var * n / (n - 1)).to(running_var.dtype), alpha=momentum)
    return mean, torch.rsqrt(var + eps)


def _shape(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, *([1] * (x.ndim - 2)))


def _elemt(x, weight, bias, mean, invstd, eps):
    if x.is_cuda:
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
    out = (x - _shape(mean, x)) * _shape(invstd, x)
    if weight is not None:
        out = out * _shape(weight, x)
    if bias is not None:
        out = out + _shape(bias, x)
    return out


def _backward_reduce(dy, x, mean, invstd, weight, need_input, need_weight, need_bias):
    """(sum dy, sum dy * (x - mean), grad_weight, grad_bias) per channel (torch.batch_norm_backward_reduce)."""
    if x.is_cuda:
        return torch.batch_norm_backward_reduce(dy, x, mean, invstd, weight, need_input, need_weight, need_bias)
    dims = [d for d in range(x.ndim) if d != 1]
    sum_dy = dy.sum(dims)
    sum_dy_xmu = (dy * (x - _shape(mean, x))).sum(dims)
    return sum_dy, sum_dy_xmu, sum_dy_xmu * invstd if need_weight else None, sum_dy if need_bias else None


def _backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    if x.is_cuda:
        return torch.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
    n = count.sum()
    scale = invstd if weight is None else invstd * weight
    return (dy - _shape(sum_dy / n, x) - (x - _shape(mean, x)) * _shape(invstd.pow(2) * sum_dy_xmu / n, x)) * _shape(
        scale, x)


class SyncBatchNormFunction(Function):
    """torch's sync_batch_norm less the empty-rank filter: every rank must have a non-empty batch."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, process_group, world_size):
        if not (x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous()):
            x = x.contiguous()
        if weight is not None:
            weight = weight.contiguous()
        mean, invstd = _stats(x, eps)
        count = torch.full((1,), x.numel() // x.size(1), dtype=mean.dtype, device=mean.device)
        combined = torch.cat([mean, invstd, count])  # C, C, 1
        if process_group._get_backend_name() != "gloo":
            gathered = torch.empty(world_size * combined.numel(), dtype=combined.dtype, device=combined.device)
            _all_gather_into(gathered, combined, process_group)
            gathered = gathered.view(world_size, -1)
        else:  # gloo has no all_gather_into_tensor
            parts = [torch.empty_like(combined) for _ in range(world_size)]
            dist.all_gather(parts, combined, process_group)
            gathered = torch.stack(parts)
        c = x.size(1)
        mean_all, invstd_all, count_all = gathered[:, :c], gathered[:, c:2 * c], gathered[:, 2 * c]
        counts = count_all if running_mean is None else count_all.to(running_mean.dtype)
        mean, invstd = _combine(x, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts)
        ctx.save_for_backward(x, weight, mean, invstd, count_all.to(torch.int32))
        ctx.process_group = process_group
        return _elemt(x, weight, bias, mean, invstd, eps)

    @staticmethod
    def backward(ctx, dy):
        if not (dy.is_contiguous(memory_format=torch.channels_last) or dy.is_contiguous()):
            dy = dy.contiguous()
        x, weight, mean, invstd, count = ctx.saved_tensors
        need = ctx.needs_input_grad
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = _backward_reduce(dy, x, mean, invstd, weight, need[0], need[1],
                                                                      need[2])
        grad_input = None
        if need[0]:
            combined = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(combined, dist.ReduceOp.SUM, ctx.process_group)
            sum_dy, sum_dy_xmu = combined.split(sum_dy.numel())
            if weight is not None and weight.dtype != mean.dtype:
                weight = weight.to(mean.dtype)
            grad_input = _backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
        if weight is None or not need[1]:
            grad_weight = None
        if weight is None or not need[2]:
            grad_bias = None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class SyncBatchNorm(nn.SyncBatchNorm):
    """nn.SyncBatchNorm (same parameters, buffers and state_dict keys) whose training forward across ranks is
    `SyncBatchNormFunction`, on any device; otherwise torch's own."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        world_size = dist.get_world_size(group) if group is not None else 1
        if not (self.training and world_size > 1):
            return super().forward(input)
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # sync: the cumulative average needs the count on the host (off by default)
                momentum = 1.0 / self.num_batches_tracked.item()
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        return SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var, self.eps, momentum,
                                           group, world_size)


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """torch's `nn.SyncBatchNorm.convert_sync_batchnorm`, converting to barlow's `SyncBatchNorm` (parameters and
    buffers carried over, the same state_dict)."""
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for m in converted.modules() if isinstance(converted, nn.Module) else ():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = SyncBatchNorm  # a subclass adding no state: only forward differs
    return converted
