"""RandomGrayscale with probability `grayscale_prob`: the luma, kept as 3 channels (a 1-channel view never grays)."""

from __future__ import annotations

import torch

from barlow.augment.ops import luma, mask

PROB = "grayscale_prob"
DEFAULTS = (0.2, 0.2)
PARAMS = ("gray",)


def draw(n: int, p: float, config, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    return (mask(n, p, g) & (config.channels == 3),)


def apply(views, x: torch.Tensor, p, f: dict[str, torch.Tensor]) -> torch.Tensor:
    return views.on(x, p.gray, grayscale) if views.config.channels == 3 else x


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """RandomGrayscale's op: luma, kept as 3 channels."""
    return luma(x).expand_as(x).contiguous()  # a real tensor: later ops write rows into it
