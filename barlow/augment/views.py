"""BYOL's two asymmetric views as one configuration: per view, the host half (crop, flip) and the device half
(colour jitter, grayscale, blur, solarize), side by side, so the asymmetry of the paper's `transform` and
`transform_prime` reads from one table.

`ViewsConfig.from_augment` builds it from a validated `AugmentSpec` (the spec holds the probability rules; nothing
here checks them again). The host half draws crop boxes and flips (`HostDraws`, run by the loader workers on the
size read from the file header); the device half (`barlow.augment.device.DeviceViews`) runs the rest batched.

Imports nothing of barlow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

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

    def host_draws(self, seed: int) -> HostDraws:
        """The host half's draws (crop boxes, flips) of one batch, from its seed."""
        return HostDraws(self, seed)


def blur_kernel_size(size: int) -> int:
    """About 10% of the image side, odd, at least 3 (23 for 224 px, as in BYOL)."""
    return max(3, round(0.1 * size) | 1)


class HostDraws:
    """The host half of one batch: per image and view, RandomResizedCrop's box (10 tries of area x U(min_scale, 1) at
    a log-uniform aspect ratio in CROP_RATIO, top and left uniform where it fits; else the centre crop at the clamped
    ratio) and the flip, drawn on the size read from the file header.

    Image i of the batch draws from row i of uniforms made from the seed (as many rows as asked for, in order), and
    every random value is made here once, exp included; the two ways in then share only IEEE-exact arithmetic
    (products, quotients, square roots, rounding), so they give the same boxes and flips bit for bit:
    `one(i, ...)` per image (cpu decode: a box is needed before the image is decoded) and `batch(...)` for a whole
    batch at once (gpu decode: drawn in the collate, at a fraction of a microsecond per image).
    """

    _TRIES = 10

    def __init__(self, config: ViewsConfig, seed: int):
        self._rng = np.random.default_rng(seed)
        self._scale = np.array([[v.min_scale, 1.0 - v.min_scale] for v in config.views])  # (views, 2): low, span
        self._flip_prob = np.array([v.flip_prob for v in config.views])
        self.frac = np.empty((0, len(config.views), self._TRIES))  # area fraction per try
        self.aspect = np.empty_like(self.frac)  # aspect ratio (w / h) per try
        self.pos = np.empty((0, len(config.views), 2))  # uniforms for top and left
        self.flip = np.empty((0, len(config.views)), dtype=bool)

    def _rows(self, n: int) -> None:
        """At least n rows; rows come from the seed's stream in order, whatever the chunks they are made in."""
        have = len(self.flip)
        if n <= have:
            return
        u = self._rng.random((max(n - have, 64), len(self._flip_prob), 2 * self._TRIES + 3))
        t = self._TRIES
        self.frac = np.concatenate([self.frac, self._scale[:, :1] + self._scale[:, 1:] * u[..., :t]])
        self.aspect = np.concatenate([self.aspect, np.exp(_LOG_CROP_RATIO[0] + _LOG_CROP_RATIO[1] * u[..., t:2 * t])])
        self.pos = np.concatenate([self.pos, u[..., 2 * t:2 * t + 2]])
        self.flip = np.concatenate([self.flip, u[..., -1] < self._flip_prob])

    def one(self, i: int, width: int, height: int) -> tuple[list[Box], list[bool]]:
        """Image i's boxes (top, left, height, width) and flips, per view."""
        self._rows(i + 1)
        boxes, area = [], width * height
        for fracs, aspects, (p_top, p_left) in zip(self.frac[i].tolist(), self.aspect[i].tolist(),
                                                   self.pos[i].tolist(), strict=True):
            for frac, aspect in zip(fracs, aspects, strict=True):
                target = area * frac
                w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
                if 0 < w <= width and 0 < h <= height:
                    boxes.append((int(p_top * (height - h + 1)), int(p_left * (width - w + 1)), h, w))
                    break
            else:
                in_ratio = width / height
                if in_ratio < CROP_RATIO[0]:
                    w, h = width, round(width / CROP_RATIO[0])
                elif in_ratio > CROP_RATIO[1]:
                    w, h = round(height * CROP_RATIO[1]), height
                else:
                    w, h = width, height
                boxes.append(((height - h) // 2, (width - w) // 2, h, w))
        return boxes, self.flip[i].tolist()

    def batch(self, index: Sequence[int], widths: Sequence[int],
              heights: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """`one` for images `index` at once: boxes (views, B, 4) int64, flips (views, B) bool."""
        index = np.asarray(index, dtype=np.int64)
        self._rows(int(index.max()) + 1 if len(index) else 0)
        width, height = np.asarray(widths, dtype=np.int64)[:, None], np.asarray(heights, dtype=np.int64)[:, None]
        target = (width * height)[..., None] * self.frac[index]  # (B, views, tries)
        aspect = self.aspect[index]
        w, h = np.rint(np.sqrt(target * aspect)), np.rint(np.sqrt(target / aspect))  # rint: round half to even
        fits = (w > 0) & (w <= width[..., None]) & (h > 0) & (h <= height[..., None])
        first = fits.argmax(-1)[..., None]
        w, h = np.take_along_axis(w, first, -1)[..., 0], np.take_along_axis(h, first, -1)[..., 0]
        pos = self.pos[index]
        top, left = np.trunc(pos[..., 0] * (height - h + 1)), np.trunc(pos[..., 1] * (width - w + 1))
        in_ratio = width / height  # where no try fits: the centre crop at the clamped ratio
        centre_w = np.where(in_ratio > CROP_RATIO[1], np.rint(height * CROP_RATIO[1]), width)
        centre_h = np.where(in_ratio < CROP_RATIO[0], np.rint(width / CROP_RATIO[0]), height)
        centre_w = np.broadcast_to(np.where(in_ratio < CROP_RATIO[0], width, centre_w), w.shape)
        centre_h = np.broadcast_to(centre_h, h.shape)
        found = fits.any(-1)
        h, w = np.where(found, h, centre_h), np.where(found, w, centre_w)
        top = np.where(found, top, (height - centre_h) // 2)
        left = np.where(found, left, (width - centre_w) // 2)
        boxes = np.stack([top, left, h, w], axis=-1).astype(np.int64).transpose(1, 0, 2)
        return np.ascontiguousarray(boxes), np.ascontiguousarray(self.flip[index].T)
