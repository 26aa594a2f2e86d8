"""LARS (the official Barlow Twins semantics), its two parameter groups, and the warmup + cosine schedule.

Imports nothing of barlow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """LARS as in the official Barlow Twins code.

    For a parameter with ndim > 1: dp = g + weight_decay * p, then dp *= eta * ||p|| / ||dp|| (factor 1 when either
    norm is 0). Parameters with ndim == 1 (biases, BatchNorm) get neither weight decay nor the trust ratio.
    Then mu = momentum * mu + dp (mu starts at 0) and p -= lr * mu.

    foreach (default): each group's update as a few multi-tensor operations (torch._foreach_*: one call for all the
    group's norms, one for the decay, ...), so the step costs a handful of dispatches, not several per parameter.
    foreach=False: the same arithmetic one parameter at a time (the readable form; the benchmark's baseline).
    Neither syncs with the host. The parameters with a gradient must share one device (a DDP model's do).
    """

    def __init__(self, params: Iterable, lr: float, weight_decay: float = 1.5e-6, momentum: float = 0.9, eta: float = 0.001,
                 foreach: bool = True):
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum), ("eta", eta)):
            if value < 0:
                raise ValueError(f"{name}: must be >= 0 (got {value})")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._group_step_foreach if self.foreach else self._group_step_loop)(group, params)
        return loss

    def _momentum(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        for p in params:
            if "mu" not in self.state[p]:
                self.state[p]["mu"] = torch.zeros_like(p)
        return [self.state[p]["mu"] for p in params]

    def _group_step_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        mats = [p for p in params if p.ndim > 1]
        vecs = [p for p in params if p.ndim <= 1]
        updates = [p.grad for p in vecs]  # 1-D: the plain gradient
        if mats:
            dps = torch._foreach_add([p.grad for p in mats], mats, alpha=group["weight_decay"])
            p_norm, dp_norm = torch.stack(torch._foreach_norm(mats)), torch.stack(torch._foreach_norm(dps))
            # torch.where keeps this on the device (no host sync).
            q = torch.where((p_norm > 0) & (dp_norm > 0), group["eta"] * p_norm / dp_norm, torch.ones_like(p_norm))
            torch._foreach_mul_(dps, q.unbind())
            updates += dps
        params = vecs + mats
        mus = self._momentum(params)
        torch._foreach_mul_(mus, group["momentum"])
        torch._foreach_add_(mus, updates)
        torch._foreach_add_(params, mus, alpha=-group["lr"])

    def _group_step_loop(self, group: dict, params: list[torch.Tensor]) -> None:
        for p, mu in zip(params, self._momentum(params), strict=True):
            dp = p.grad
            if p.ndim > 1:
                dp = dp.add(p, alpha=group["weight_decay"])
                p_norm, dp_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(dp)
                # torch.where keeps this on the device (no host sync per parameter).
                q = torch.where((p_norm > 0) & (dp_norm > 0), group["eta"] * p_norm / dp_norm, torch.ones_like(p_norm))
                dp = dp.mul(q)
            mu.mul_(group["momentum"]).add_(dp)
            p.add_(mu, alpha=-group["lr"])


def param_groups(model: nn.Module, lr_weights: float, lr_biases: float) -> list[dict]:
    """Two LARS groups: "weights" (ndim > 1) and "biases" (ndim == 1: biases and BatchNorm), each with its "base_lr".

    "lr" starts at the base lr; WarmupCosine.apply() overwrites it every step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    weights = [p for p in params if p.ndim > 1]
    biases = [p for p in params if p.ndim <= 1]
    return [
        {"params": weights, "lr": lr_weights, "base_lr": lr_weights, "name": "weights"},
        {"params": biases, "lr": lr_biases, "base_lr": lr_biases, "name": "biases"},
    ]


class WarmupCosine:
    """Linear warmup then cosine decay, as a factor of the peak lr (peak = base_lr * batch_size / 256).

    Steps count optimizer steps from 0. factor(0) = 1 / warmup_steps (the official code starts at 0, which wastes a
    step); factor(warmup_steps - 1) = 1 (peak); then cosine down to factor(total_steps - 1) = final_ratio, the last
    step a run of total_steps takes; steps past it stay at final_ratio. warmup_steps = 0 starts at the peak.
    """

    def __init__(self, warmup_steps: int, total_steps: int, batch_size: int, final_ratio: float = 0.001):
        if total_steps < 1:
            raise ValueError(f"total_steps: must be >= 1 (got {total_steps})")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps: must be between 0 and total_steps ({total_steps}) (got {warmup_steps})")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1 (got {batch_size})")
        if not 0 <= final_ratio <= 1:
            raise ValueError(f"final_ratio: must be between 0 and 1 (got {final_ratio})")
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.batch_size, self.final_ratio = batch_size, final_ratio

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        start = max(self.warmup_steps - 1, 0)  # the peak step; the cosine runs from here to total_steps - 1
        t = min(max((step - start) / max(self.total_steps - 1 - start, 1), 0.0), 1.0)
        return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def lr(self, base_lr: float, step: int) -> float:
        return base_lr * self.batch_size / 256 * self.factor(step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every group's lr to base_lr * batch_size / 256 * factor(step)."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr(group["base_lr"], step)
