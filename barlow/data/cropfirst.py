"""Decode + augment with the random crops chosen before decoding, so JPEGs decode at reduced size when they can.

An augmentation whose views each begin with `RandomResizedCrop` (barlow.augment.TwoViews, train_transform)
runs in four steps: draw every view's crop box on the full-resolution size read from the JPEG header (with the
view's own RandomResizedCrop.make_params, so the crop distribution is unchanged); decode in PIL draft mode at
the largest 1/2, 1/4 or 1/8 reduction that keeps every crop at least the output size (so no view is upsampled
more than at full size); convert the decoded image to a tensor once for both views; then each view's own
resized-crop kernel on its (scaled) box, and the rest of the view (flip, jitter, blur, ...) unchanged.
Other transforms get a plain full-size decode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image
from torchvision.transforms import v2

from barlow.data.decode import decode_image, draft_scale, open_image

# conversions that may run before the crop: they commute with it (mode / type changes only)
_BEFORE_CROP_OK = {"_ToImage", "ToImage", "PILToTensor"}


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
    ops = list(getattr(view, "transforms", []))
    crops = [i for i, t in enumerate(ops) if isinstance(t, v2.RandomResizedCrop)]
    if len(crops) != 1 or any(type(t).__name__ not in _BEFORE_CROP_OK for t in ops[:crops[0]]):
        return None
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
        converted = self.views[0].convert(img) if self.shared_convert else None  # e.g. one PIL -> tensor for both
        outs = []
        for p, v in zip(params, self.views, strict=True):
            top, left = min(round(p["top"] * sy), img.size[1] - 1), min(round(p["left"] * sx), img.size[0] - 1)
            height = max(1, min(round(p["height"] * sy), img.size[1] - top))
            width_ = max(1, min(round(p["width"] * sx), img.size[0] - left))
            outs.append(v.finish(converted if converted is not None else v.convert(img), top, left, height, width_))
        return tuple(outs) if self.pair else outs[0]


def decoder(transform: Callable, channels: int, crop_first: bool = True) -> Callable[[bytes, str], Any]:
    """bytes, name -> transform(decoded image): crop-first where the transform allows, else plain decode."""
    fast = CropFirst.wrap(transform, channels) if crop_first else None
    if fast is not None:
        return fast
    return lambda data, name: transform(decode_image(data, name, channels))
