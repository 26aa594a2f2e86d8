"""The device half's view ops: one module each, listed in `OPS` in the order they are drawn and applied.

An op module defines
- `PROB`: its probability's field name, in `barlow.augment.View` and in `barlow.spec.AugmentSpec` (a float for both
  views, or a list of two, one per view: that name also goes in AugmentSpec's two-values validator);
- `DEFAULTS`: BYOL's probability for view 1 and view 2 (`ViewsConfig()` without a spec);
- `PARAMS`: its per-sample fields of `barlow.augment.ViewParams`, drawn in this order; optionally `FACTORS`, those
  of them that are float values the op reads on the device (copied there with the other ops' in one transfer);
- `draw(n, p, config, g)`: the PARAMS for n samples, from the CPU generator g (p: this view's probability, config:
  the `ViewsConfig`);
- `apply(views, x, params, factors)`: the op on a float batch x on [0, 1], through `views.on(x, mask, fn, *factors)`
  (fn on the samples where the CPU mask is True; views: the `DeviceViews`); optionally `buffers(config)`: its
  constant tensors, kept by DeviceViews as buffers (moved with it, never built on the device).

A new op goes last in `OPS`: every op draws from one generator per view, so an op placed earlier would move the
draws of the ops after it (and change every seeded result).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

OPS = (  # applied in this order (ColorJitter, RandomGrayscale, GaussianBlur, Solarization as in BYOL's views)
    "barlow.augment.ops.jitter",
    "barlow.augment.ops.grayscale",
    "barlow.augment.ops.blur",
    "barlow.augment.ops.solarize",
)

LUMA_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


@functools.cache
def view_ops() -> tuple[ModuleType, ...]:
    """The op modules of `OPS`, in order."""
    return tuple(importlib.import_module(name) for name in OPS)


def luma(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luma, torchvision's weights and operation order."""
    r, g, b = x.unbind(dim=1)
    return r.mul(LUMA_WEIGHTS[0]).add_(g, alpha=LUMA_WEIGHTS[1]).add_(b, alpha=LUMA_WEIGHTS[2]).unsqueeze(1)


def as_float(op, a: torch.Tensor, b) -> torch.Tensor:
    """A comparison as a 0/1 float tensor (writing floats directly is ~10x faster on the CPU than bool + where)."""
    return op(a, b, out=torch.empty(torch.broadcast_shapes(a.shape, getattr(b, "shape", ())), device=a.device))


def mask(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    """Which of n samples an op with probability p touches (one uniform each, from g)."""
    return torch.rand(n, generator=g) < p


def uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high, generator=g)
