"""BYOL's two asymmetric views as one configuration: per view, the host half (crop, flip) and the device half
(colour jitter, grayscale, blur, solarize), side by side, so the asymmetry of the paper's `transform` and
`transform_prime` reads from one table.

`ViewsConfig.from_augment` builds it from a validated `AugmentSpec` (the spec holds the probability rules; nothing
here checks them again). The host half draws crop boxes and flips (`draw_host`, run by the loader workers on the
size read from the file header); the device half (`barlow.augment.device.DeviceViews`) runs the rest batched.

Imports nothing of barlow.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple, Protocol

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128  # on uint8 pixels (128/255 on [0, 1] floats)
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range

_LOG_CROP_RATIO = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1] / CROP_RATIO[0]))  # log-uniform: low end, span
Box = tuple[int, int, int, int]  # a crop box: top, left, height, width (a plain tuple: drawn per image, per view)


class Jitter(NamedTuple):
    """ColorJitter's strengths: factors in [1 - s, 1 + s] (hue: a shift in [-s, s])."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1


JITTER_OPS = Jitter._fields  # the index used in ViewParams.order


@dataclass(frozen=True)
class View:
    """One view's probabilities: the host half (crop scale, flip), then the device half."""

    min_scale: float = 0.08  # host: RandomResizedCrop scale (min_scale, 1)
    flip_prob: float = 0.5  # host
    jitter_prob: float = 0.8  # device: ColorJitter in a per-sample random order
    grayscale_prob: float = 0.2  # device (3 channels only)
    blur_prob: float = 1.0  # device: Gaussian blur, sigma ~ U(BLUR_SIGMA)
    solarize_prob: float = 0.0  # device: solarize at SOLARIZE_THRESHOLD


class AugmentSettings(Protocol):
    """What `ViewsConfig.from_augment` reads: barlow.spec.AugmentSpec's fields."""

    min_scale: float
    flip_prob: float
    jitter_prob: float
    grayscale_prob: float
    blur_prob: list[float]
    solarize_prob: list[float]


@dataclass(frozen=True)
class ViewsConfig:
    """Both views of BYOL (the defaults are the paper's): `views[0]` is `transform`, `views[1]` `transform_prime`."""

    size: int = 224
    channels: int = 3
    views: tuple[View, View] = (View(blur_prob=1.0, solarize_prob=0.0), View(blur_prob=0.1, solarize_prob=0.2))
    jitter: Jitter = field(default_factory=Jitter)

    @classmethod
    def from_augment(cls, augment: AugmentSettings, size: int, channels: int) -> ViewsConfig:
        """The views of a validated spec section (`data.augment`), for `size` px crops with `channels` channels."""
        common = dict(min_scale=augment.min_scale, flip_prob=augment.flip_prob, jitter_prob=augment.jitter_prob,
                      grayscale_prob=augment.grayscale_prob)
        return cls(size, channels, (View(**common, blur_prob=augment.blur_prob[0], solarize_prob=augment.solarize_prob[0]),
                                    View(**common, blur_prob=augment.blur_prob[1], solarize_prob=augment.solarize_prob[1])))

    @property
    def kernel_size(self) -> int:
        return blur_kernel_size(self.size)

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return (IMAGENET_MEAN, IMAGENET_STD) if self.channels == 3 else (GRAY_MEAN, GRAY_STD)

    def draw_host(self, rng: random.Random, width: int, height: int) -> tuple[list[Box], list[bool]]:
        """The host half for one image of `width` x `height` (read from its header): per view, in this order, the
        crop box (RandomResizedCrop's algorithm) and the flip; view 1, then view 2."""
        (scale1, flip1), (scale2, flip2) = self._host_draws  # unrolled: this runs per image on the GPU data path
        box1, flipped1 = crop_box(rng, width, height, scale1), rng.random() < flip1
        return [box1, crop_box(rng, width, height, scale2)], [flipped1, rng.random() < flip2]

    @cached_property
    def _host_draws(self) -> tuple[tuple[tuple[float, float], float], ...]:
        return tuple(((view.min_scale, 1.0), view.flip_prob) for view in self.views)


def blur_kernel_size(size: int) -> int:
    """About 10% of the image side, odd, at least 3 (23 for 224 px, as in BYOL)."""
    return max(3, round(0.1 * size) | 1)


def crop_box(rng: random.Random, width: int, height: int, scale: tuple[float, float],
             ratio: tuple[float, float] = CROP_RATIO) -> Box:
    """`v2.RandomResizedCrop.make_params`'s algorithm (10 tries of area x U(scale) at a log-uniform aspect ratio,
    else the centre crop at the clamped ratio), drawn from a Python RNG: ~10x cheaper than its many tiny torch ops.
    It runs twice per image on the host part of the GPU data path, so it keeps to bare `random()` draws."""
    rand, sqrt, exp = rng.random, math.sqrt, math.exp
    log_lo, log_span = _LOG_CROP_RATIO if ratio is CROP_RATIO else (math.log(ratio[0]), math.log(ratio[1] / ratio[0]))
    area, scale_lo, scale_span = width * height, scale[0], scale[1] - scale[0]
    for _ in range(10):
        target = area * (scale_lo + scale_span * rand())
        aspect = exp(log_lo + log_span * rand())
        w, h = round(sqrt(target * aspect)), round(sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:  # top and left uniform over the positions that fit
            return int(rand() * (height - h + 1)), int(rand() * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
