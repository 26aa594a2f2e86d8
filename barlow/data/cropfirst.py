"""Decode + augment with the random crops chosen before decoding, so JPEGs decode at reduced size when they can.

An augmentation whose views each begin with `RandomResizedCrop` (barlow.augment.TwoViews, train_transform)
is run in three steps: draw every view's crop box on the full-resolution size read from the JPEG header
(with the view's own RandomResizedCrop.make_params, so the crop distribution is unchanged); decode in PIL
draft mode at the largest 1/2, 1/4, 1/8 reduction that keeps every crop at least the output size (no view
is ever upsampled more than at full size); crop + resize each box in one PIL resize, then run the rest of the
view (flip, jitter, blur, ...) unchanged. Other transforms get a plain full-size decode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image
from torchvision.transforms import v2

from barlow.data.decode import decode_image, draft_scale, open_image

# conversions that may run before the crop: they commute with it (mode / type changes only)
_BEFORE_CROP_OK = {"_ToImage", "ToImage", "PILToTensor"}
_PIL_RESAMPLE = {v2.InterpolationMode.BILINEAR: Image.BILINEAR, v2.InterpolationMode.BICUBIC: Image.BICUBIC,
                 v2.InterpolationMode.NEAREST: Image.NEAREST, v2.InterpolationMode.LANCZOS: Image.LANCZOS,
                 v2.InterpolationMode.BOX: Image.BOX, v2.InterpolationMode.HAMMING: Image.HAMMING}


class _View:
    """One view split at its RandomResizedCrop: the crop, and what runs before and after it."""

    def __init__(self, before: list[Callable], crop: v2.RandomResizedCrop, after: list[Callable]):
        self.before, self.crop, self.after = before, crop, after
        interpolation = crop.interpolation
        if isinstance(interpolation, str):
            interpolation = v2.InterpolationMode(interpolation)
        self.resample = _PIL_RESAMPLE[interpolation]
        self.out_h, self.out_w = crop.size

    def finish(self, img: Image.Image, box: tuple[float, float, float, float]) -> Any:
        out = img.resize((self.out_w, self.out_h), self.resample, box=box)
        for t in self.before + self.after:
            out = t(out)
        return out


def _split(view: Any) -> _View | None:
    ops = list(getattr(view, "transforms", []))
    crops = [i for i, t in enumerate(ops) if isinstance(t, v2.RandomResizedCrop)]
    if len(crops) != 1 or any(type(t).__name__ not in _BEFORE_CROP_OK for t in ops[:crops[0]]):
        return None
    crop = ops[crops[0]]
    interpolation = v2.InterpolationMode(crop.interpolation) if isinstance(crop.interpolation, str) else crop.interpolation
    if interpolation not in _PIL_RESAMPLE:
        return None
    return _View(ops[:crops[0]], crop, ops[crops[0] + 1:])


class CropFirst:
    """`transform(image)` computed from JPEG bytes with crop-before-decode; see the module doc."""

    def __init__(self, views: list[_View], channels: int, pair: bool):
        self.views, self.channels, self.pair = views, channels, pair
        self.last_scale = 1  # the reduction the last image was decoded at (for tests and benchmarks)

    @classmethod
    def wrap(cls, transform: Any, channels: int) -> CropFirst | None:
        """A CropFirst for a transform of this shape (two views, or one Compose), else None."""
        if hasattr(transform, "view1") and hasattr(transform, "view2"):
            views = [_split(transform.view1), _split(transform.view2)]
            return cls(views, channels, pair=True) if all(views) else None
        view = _split(transform)
        return cls([view], channels, pair=False) if view else None

    def __call__(self, data: bytes, name: str) -> Any:
        img = open_image(data, name)
        width, height = img.size
        params = [v.crop.make_params([img]) for v in self.views]  # header size only: nothing decoded yet
        # the largest reduction that keeps every crop at least its output size
        room = min(min(p["width"] / v.out_w, p["height"] / v.out_h) for p, v in zip(params, self.views, strict=True))
        scale = next((s for s in (8, 4, 2) if room >= s and draft_scale(width, height, (width // s, height // s)) == s), 1)
        self.last_scale = scale
        img = decode_image(img, name, self.channels, (width // scale, height // scale) if scale > 1 else None)
        sx, sy = img.size[0] / width, img.size[1] / height
        outs = []
        for p, v in zip(params, self.views, strict=True):
            box = (p["left"] * sx, p["top"] * sy, (p["left"] + p["width"]) * sx, (p["top"] + p["height"]) * sy)
            outs.append(v.finish(img, box))
        return tuple(outs) if self.pair else outs[0]


def decoder(transform: Callable, channels: int, crop_first: bool = True) -> Callable[[bytes, str], Any]:
    """bytes, name -> transform(decoded image): crop-first where the transform allows, else plain decode."""
    fast = CropFirst.wrap(transform, channels) if crop_first else None
    if fast is not None:
        return fast
    return lambda data, name: transform(decode_image(data, name, channels))
