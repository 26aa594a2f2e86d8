"""Solarization with probability `solarize_prob` (BYOL: 0.0 in view 1, 0.2 in view 2): pixels at or above
SOLARIZE_THRESHOLD inverted."""

from __future__ import annotations

import torch

from barlow.augment.ops import as_float, mask

PROB = "solarize_prob"
DEFAULTS = (0.0, 0.2)
PARAMS = ("solarize",)

SOLARIZE_THRESHOLD = 128  # on uint8 pixels (128/255 on [0, 1] floats)
SOLARIZE_FLOAT = SOLARIZE_THRESHOLD / 255  # on [0, 1] floats: the same pixels as 128 on uint8 ones


def draw(n: int, p: float, config, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    return (mask(n, p, g),)


def apply(views, x: torch.Tensor, p, f: dict[str, torch.Tensor]) -> torch.Tensor:
    return views.on(x, p.solarize, solarize)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """where(x >= 128/255, 1 - x, x), as x + m (1 - 2x) with m in {0, 1}: exact on [0, 1], faster than where."""
    return (1.0 - 2.0 * x).mul_(as_float(torch.ge, x, SOLARIZE_FLOAT)).add_(x)
