"""ColorJitter(brightness, contrast, saturation, hue) with probability `jitter_prob`, its four ops in a per-sample
random order (v2.ColorJitter's randperm per image, not one order per batch): torchvision's formulas on [0, 1] floats
with per-sample factors."""

from __future__ import annotations

from typing import NamedTuple

import torch

from barlow.augment.ops import as_float, luma, mask, uniform

PROB = "jitter_prob"
DEFAULTS = (0.8, 0.8)
PARAMS = ("jitter", "order", "brightness", "contrast", "saturation", "hue")
FACTORS = ("brightness", "contrast", "saturation", "hue")

_HUE_SECTORS = (5.0, 3.0, 1.0)  # n_c of adjust_hue's closed form, per channel (R, G, B)


class Jitter(NamedTuple):
    """ColorJitter's strengths: factors in [1 - s, 1 + s] (hue: a shift in [-s, s])."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1


JITTER_OPS = Jitter._fields  # the index used in ViewParams.order


def draw(n: int, p: float, config, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Whether each sample is jittered, its order of the four ops (indices into JITTER_OPS), and the four factors
    (drawn for every sample, used where jittered)."""
    b, c, s, h = config.jitter
    return (mask(n, p, g), torch.rand(n, len(JITTER_OPS), generator=g).argsort(dim=1), uniform(n, 1 - b, 1 + b, g),
            uniform(n, 1 - c, 1 + c, g), uniform(n, 1 - s, 1 + s, g), uniform(n, -h, h, g))


def apply(views, x: torch.Tensor, p, f: dict[str, torch.Tensor]) -> torch.Tensor:
    ops = ((adjust_brightness, f["brightness"]), (adjust_contrast, f["contrast"]),
           (adjust_saturation, f["saturation"]), (views.hue_op, f["hue"]))  # hue_op: a benchmark may swap it
    for step in range(len(ops)):  # step k applies each sample's k-th op: each op once per sample, in its own order
        for op_index, (op, factor) in enumerate(ops):
            x = views.on(x, p.jitter & (p.order[:, step] == op_index), op, factor)
    return x


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend on [0, 1] floats with a per-sample ratio: a * r + b * (1 - r), clamped."""
    return (a * ratio).add_(b * (1.0 - ratio)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    gray = luma(x) if x.shape[1] == 3 else x
    return _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else _blend(x, luma(x), f)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (RGB -> HSV, h += f mod 1, HSV -> RGB) with a per-sample shift f in [-0.5, 0.5].

    Computed without leaving RGB: the shift keeps each pixel's max and min channel, so with 6h from Pillow's
    formula (torchvision's _rgb_to_hsv) channel c becomes max - (max - min) * clamp(min(k, 4 - k), 0, 1),
    k = (n_c + 6h) mod 6, n = (5, 3, 1): the continuous form of torchvision's (p, q, t) sector table, equal up to
    float rounding, in about a third of the passes over the image and no integer gather.
    """
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    crange = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = (crange + as_float(torch.eq, crange, 0.0)).reciprocal_()  # grey pixels: any finite h (crange is 0 there)
    is_r = as_float(torch.eq, maxc, r)
    is_g = as_float(torch.eq, maxc, g).mul_(1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    h6 = ((g - b) * is_r).add_(((b - r) + 2.0 * crange) * is_g).add_(((r - g) + 4.0 * crange) * is_b).mul_(inv)
    h6 = h6.add_(6.0 * f.view(-1, 1, 1))
    k = torch.empty_like(x)
    for c, n in enumerate(_HUE_SECTORS):  # Python scalars: no constant tensor to build on the device
        torch.add(h6, n, out=k[:, c])
    k = k.sub_(torch.floor(k / 6.0).mul_(6.0))  # mod 6 (remainder_ is slower on the CPU)
    k = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (maxc.unsqueeze(1) - crange.unsqueeze(1) * k).clamp_(0.0, 1.0)
