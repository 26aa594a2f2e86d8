"""BYOL's two asymmetric views as one configuration, side by side as in the paper's (and Barlow Twins' main.py)
`transform` and `transform_prime`: per view, the host half (crop scale, flip) and one probability per device op
(`barlow.augment.ops.OPS`: colour jitter, grayscale, blur, solarize), each field named as in the spec's
`data.augment` (barlow.spec.AugmentSpec).

`ViewsConfig.from_augment` builds it from a validated `AugmentSpec` (the spec holds the probability rules; nothing
here checks them again). The host half draws crop boxes and flips (`HostDraws`, run by the loader workers on the
size read from the file header); the device half (`barlow.augment.device.DeviceViews`) runs the rest batched.

Of barlow outside this package it imports only the crop box type of the crop-first decoder (barlow.data.cropfirst).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

import numpy as np

from barlow.augment.ops import view_ops
from barlow.augment.ops.blur import blur_kernel_size
from barlow.augment.ops.jitter import Jitter
from barlow.data.cropfirst import Box

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range

_LOG_CROP_RATIO = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1] / CROP_RATIO[0]))  # log-uniform: low end, span

# every field of a view with BYOL's value in view 1 and view 2: the host half's, then each device op's (its module's
# PROB and DEFAULTS, in OPS order)
BYOL: dict[str, tuple[float, float]] = {
    "min_scale": (0.08, 0.08),  # host: RandomResizedCrop scale (min_scale, 1)
    "flip_prob": (0.5, 0.5),  # host: horizontal flip
    **{op.PROB: op.DEFAULTS for op in view_ops()},
}

View = make_dataclass("View", [(name, float, byol[0]) for name, byol in BYOL.items()], frozen=True)
View.__module__, View.__doc__ = __name__, "One view's settings: the host half's, then one probability per device op."


@dataclass(frozen=True)
class ViewsConfig:
    """Both views of BYOL (the defaults are the paper's): `views[0]` is `transform`, `views[1]` `transform_prime`."""

    size: int = 224
    channels: int = 3
    views: tuple[View, View] = tuple(View(**{name: byol[v] for name, byol in BYOL.items()}) for v in (0, 1))
    jitter: Jitter = field(default_factory=Jitter)

    @classmethod
    def from_augment(cls, augment: Any, size: int, channels: int) -> ViewsConfig:
        """The views of a validated spec section (`data.augment`: a field per View field, one value for both views
        or a list of two), for `size` px crops with `channels` channels."""

        def value(name: str, view: int) -> float:
            v = getattr(augment, name)
            return v[view] if isinstance(v, (list, tuple)) else v

        return cls(size, channels, tuple(View(**{f.name: value(f.name, v) for f in fields(View)}) for v in (0, 1)))

    @property
    def kernel_size(self) -> int:
        return blur_kernel_size(self.size)

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return (IMAGENET_MEAN, IMAGENET_STD) if self.channels == 3 else (GRAY_MEAN, GRAY_STD)

    def host_draws(self, seed: int) -> HostDraws:
        """The host half's draws (crop boxes, flips) of one batch, from its seed."""
        return HostDraws(self, seed)


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
