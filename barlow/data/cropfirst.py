"""Decode + augment with the random crops chosen before decoding, so JPEGs decode at reduced size when they can.

An augmentation whose views each begin with `RandomResizedCrop` (barlow.augment.TwoViews, train_transform)
runs in four steps: draw every view's crop box on the full-resolution size read from the JPEG header (with the
view's own RandomResizedCrop.make_params, so the crop distribution is unchanged); decode in PIL draft mode at
the largest 1/2, 1/4 or 1/8 reduction that keeps every crop at least the output size (so no view is upsampled
more than at full size); convert the decoded image to a tensor once for both views; then each view's own
resized-crop kernel on its (scaled) box, and the rest of the view (flip, jitter, blur, ...) unchanged.

The contract: a view that contains a RandomResizedCrop must have only conversions before it (`_BEFORE_CROP_OK`);
any other op there (a new augmentation placed before the crop) is a `CropFirstError` naming it, never a silent
switch to full-size decoding. Pass `crop_first=False` to `decoder()` to decode such a transform at full size on
purpose. Transforms without a RandomResizedCrop (evaluation's resize + centre crop) get a plain full-size decode.

`HostCrops` is the training path: the host half of BYOL's views (crop box, uint8 crop at output size, flip);
the rest of the views runs batched on the training device (barlow.augment.DeviceViews).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from torch.nn.functional import interpolate
from torchvision.transforms import v2

from barlow.data.decode import decode_image, decode_pixels, draft_scale, open_image

# conversions that may run before the crop: they commute with it (mode / type changes only)
_BEFORE_CROP_OK = {"_ToImage", "ToImage", "PILToTensor"}


class CropFirstError(ValueError):
    """A transform whose crop cannot move before decoding (an op before RandomResizedCrop that is not a conversion)."""


class _View:
    """One view split at its RandomResizedCrop: the conversions before it, the crop, and the ops after it."""

    def __init__(self, before: list[Callable], crop: v2.RandomResizedCrop, after: list[Callable]):
        self.before, self.crop, self.after = before, crop, after
        self.out_h, self.out_w = crop.size

    def convert(self, img: Image.Image) -> Any:
        for t in self.before:
            img = t(img)
        return img

    def finish(self, img: Any, top: int, left: int, height: int, width: int) -> Any:
        """The view's own resized-crop kernel (torch's uint8 resize is 2-3x faster than PIL's), then the rest."""
        out = v2.functional.resized_crop(img, top, left, height, width, list(self.crop.size),
                                         interpolation=self.crop.interpolation, antialias=self.crop.antialias)
        for t in self.after:
            out = t(out)
        return out


def _split(view: Any) -> _View | None:
    """The view split at its crop; None without a RandomResizedCrop; CropFirstError if the crop cannot go first."""
    ops = list(getattr(view, "transforms", []))
    crops = [i for i, t in enumerate(ops) if isinstance(t, v2.RandomResizedCrop)]
    if not crops:
        return None
    blocking = [type(t).__name__ for t in ops[:crops[0]] if type(t).__name__ not in _BEFORE_CROP_OK]
    if len(crops) > 1 or blocking:
        why = f"{', '.join(blocking)} before RandomResizedCrop" if blocking else "more than one RandomResizedCrop"
        raise CropFirstError(f"crop-first decoding: {why}; only conversions ({', '.join(sorted(_BEFORE_CROP_OK))}) "
                             "may precede the crop (move the op after it, or decode at full size with crop_first=False)")
    return _View(ops[:crops[0]], ops[crops[0]], ops[crops[0] + 1:])


class CropFirst:
    """`transform(image)` computed from JPEG bytes with crop-before-decode; see the module doc."""

    def __init__(self, views: list[_View], channels: int, pair: bool):
        self.views, self.channels, self.pair = views, channels, pair
        self.last_scale = 1  # the reduction the last image was decoded at (for tests and benchmarks)
        # the views' conversions are usually the same (ToImage): then the full image is converted once, not per view
        self.shared_convert = len({repr(v.before) for v in views}) == 1

    @classmethod
    def wrap(cls, transform: Any, channels: int) -> CropFirst | None:
        """A CropFirst for a transform of this shape (two views, or one Compose), None for a transform without a
        RandomResizedCrop; CropFirstError for one whose crop cannot go first (see the module doc)."""
        if hasattr(transform, "view1") and hasattr(transform, "view2"):
            views = [_split(transform.view1), _split(transform.view2)]
            if any(views) and not all(views):
                raise CropFirstError("crop-first decoding: one view has a RandomResizedCrop, the other none")
            return cls(views, channels, pair=True) if all(views) else None
        view = _split(transform)
        return cls([view], channels, pair=False) if view else None

    def __call__(self, data: bytes, name: str) -> Any:
        img = open_image(data, name)
        # boxes on the header size only: nothing decoded yet
        crops = [(v.crop.make_params([img]), v.out_h, v.out_w) for v in self.views]
        img, boxes, self.last_scale = decode_for_crops(img, name, self.channels, crops)
        converted = self.views[0].convert(img) if self.shared_convert else None  # e.g. one PIL -> tensor for both
        outs = [v.finish(converted if converted is not None else v.convert(img), *box)
                for box, v in zip(boxes, self.views, strict=True)]
        return tuple(outs) if self.pair else outs[0]


def decode_for_crops(img: Image.Image, name: str, channels: int, crops: list[tuple[dict[str, int], int, int]],
                     data: bytes | None = None) -> tuple[Any, list[tuple[int, int, int, int]], int]:
    """Decode an opened image for crops `(box on the full size, out_h, out_w)`: at the largest JPEG draft reduction
    that keeps every crop at least its output size. Returns the image (PIL; with `data`, the bytes it was opened
    from, a CHW uint8 tensor via decode.decode_pixels), each box as (top, left, height, width) scaled to the
    decoded size (inside it, at least 1 px), and the reduction."""
    width, height = img.size
    room = min(min(b["width"] / out_w, b["height"] / out_h) for b, out_h, out_w in crops)
    scale = next((s for s in (8, 4, 2) if room >= s and draft_scale(width, height, (width // s, height // s)) == s), 1)
    min_size = (width // scale, height // scale) if scale > 1 else None
    if data is None:
        img = decode_image(img, name, channels, min_size)
        dw, dh = img.size
    else:
        img = decode_pixels(data, img, name, channels, min_size)
        dh, dw = img.shape[-2:]
    sx, sy, boxes = dw / width, dh / height, []
    for b, _, _ in crops:
        top, left = min(round(b["top"] * sy), dh - 1), min(round(b["left"] * sx), dw - 1)
        boxes.append((top, left, max(1, min(round(b["height"] * sy), dh - top)),
                      max(1, min(round(b["width"] * sx), dw - left))))
    return img, boxes, scale


def crop_box(rng: random.Random, width: int, height: int, scale: tuple[float, float],
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> dict[str, int]:
    """`v2.RandomResizedCrop.make_params`'s algorithm (10 tries of area x U(scale) at a log-uniform aspect ratio,
    else the centre crop at the clamped ratio), drawn from a Python RNG: ~10x cheaper than its many tiny torch ops."""
    area, log_lo, log_hi = width * height, math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return dict(top=rng.randint(0, height - h), left=rng.randint(0, width - w), height=h, width=w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return dict(top=(height - h) // 2, left=(width - w) // 2, height=h, width=w)


def decoder(transform: Callable, channels: int, crop_first: bool = True) -> Callable[[bytes, str], Any]:
    """bytes, name -> transform(decoded image): crop-first for a transform with a RandomResizedCrop (an error if
    its crop cannot go first, unless crop_first=False), a plain decode otherwise. A HostCrops takes the bytes."""
    if isinstance(transform, HostCrops):
        return transform
    fast = CropFirst.wrap(transform, channels) if crop_first else None
    if fast is not None:
        return fast
    return lambda data, name: transform(decode_image(data, name, channels))


@dataclass
class Encoded:
    """A batch for device decoding (decode=gpu): the file bytes per sample, and per view the crop boxes
    (top, left, height, width on the full-size image) and flips; `barlow.data.devicedecode.decode_views` takes them."""

    data: list[torch.Tensor]  # uint8, 1-D: the file as stored
    boxes: tuple[torch.Tensor, torch.Tensor]  # (B, 4) int64 per view
    flips: tuple[torch.Tensor, torch.Tensor]  # (B,) bool per view
    names: list[str]  # for the message when an image turns out undecodable on the device

    def pin_memory(self) -> Encoded:
        return Encoded([d.pin_memory() for d in self.data], self.boxes, self.flips, self.names)


class HostCrops:
    """The host half of BYOL's two views, as a bytes -> sample transform for the loaders.

    Per view, from a Python RNG reseeded per batch (`reseed`) in this order: the crop box (RandomResizedCrop's
    algorithm, `crop_box`, scale (min_scale, 1), drawn on the size read from the file header, nothing decoded yet),
    then the flip (p = flip_prob); view 1, then view 2.
    decode=cpu: the crops decoded crop-first (JPEG draft at the largest reduction that keeps each crop at least
    the output size), resized (bicubic, antialiased) to size x size uint8 and flipped: `(x1, x2)` per batch.
    decode=gpu: only the bytes, boxes and flips (`Encoded`); the same seed gives the same boxes and flips as cpu.
    """

    def __init__(self, size: int, channels: int = 3, min_scale: float = 0.08, flip_prob: float = 0.5,
                 decode: Literal["cpu", "gpu"] = "cpu"):
        if decode not in ("cpu", "gpu"):
            raise ValueError(f"decode: must be cpu or gpu (got {decode!r})")
        self.size, self.channels, self.flip_prob, self.decode = size, channels, flip_prob, decode
        self.scale = (min_scale, 1.0)
        self.rng = random.Random(0)  # reseeded per batch (`reseed`, called by source.build_batch)
        self.last_scale = 1  # the reduction the last image was decoded at (for tests and benchmarks)

    def reseed(self, seed: int) -> None:
        self.rng.seed(seed)

    def draw(self, img: Image.Image) -> tuple[list[dict[str, int]], list[bool]]:
        """Both views' crop boxes and flips for an opened (not decoded) image."""
        boxes, flips = [], []
        for _ in range(2):
            boxes.append(crop_box(self.rng, *img.size, self.scale))
            flips.append(self.rng.random() < self.flip_prob)
        return boxes, flips

    def __call__(self, data: bytes, name: str) -> Any:
        img = open_image(data, name)
        boxes, flips = self.draw(img)
        if self.decode == "gpu":
            box = [torch.tensor([b["top"], b["left"], b["height"], b["width"]]) for b in boxes]
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flips, name
        pixels, crops, self.last_scale = decode_for_crops(img, name, self.channels,
                                                          [(b, self.size, self.size) for b in boxes], data)
        pixels = pixels[None]
        views = []
        for (top, left, h, w), flip in zip(crops, flips, strict=True):
            out = pixels[..., top:top + h, left:left + w]
            if (h, w) != (self.size, self.size):  # v2's resized_crop kernel without its dispatch (tested equal)
                out = interpolate(out, size=(self.size, self.size), mode="bicubic", align_corners=False,
                                  antialias=True)
            views.append(out[0].flip(-1) if flip else out[0])
        return tuple(views)

    def collate(self, samples: list[Any]) -> Any:
        if self.decode == "cpu":
            return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
        return Encoded([s[0] for s in samples], (torch.stack([s[1][0] for s in samples]),
                                                  torch.stack([s[1][1] for s in samples])),
                       (torch.tensor([s[2][0] for s in samples]), torch.tensor([s[2][1] for s in samples])),
                       [s[3] for s in samples])
