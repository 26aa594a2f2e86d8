"""Decoding with the random crops chosen before decoding, so JPEGs decode at reduced size when they can.

What the loaders' per-sample transforms of barlow.augment decode with: `HostCrops` (the training views' host half:
crop boxes from `barlow.augment.HostDraws`) through `decode_for_crops`, handing decode=gpu batches over as `Encoded`;
`ImageTransform` (any per-image transform, linear eval's) through `CropFirst` where it begins with a
RandomResizedCrop. This module decodes; which crops to draw and what happens to them after is barlow.augment's.

Crop-first runs in four steps: draw the crop box on the full-resolution size read from the JPEG header (with the
view's own RandomResizedCrop.make_params, or `barlow.augment.HostDraws`, so the crop distribution is unchanged); decode
in PIL draft mode at the largest 1/2, 1/4 or 1/8 reduction that keeps every crop at least the output size (so no
view is upsampled more than at full size); the resized-crop kernel on the (scaled) box; then the rest of the view.

The contract: a view that contains a RandomResizedCrop must have only conversions before it (`_BEFORE_CROP_OK`);
any other op there (a new augmentation placed before the crop) is a `CropFirstError` naming it, never a silent
switch to full-size decoding. Pass `crop_first=False` to `ImageTransform` to decode such a transform at full size on
purpose. Transforms without a RandomResizedCrop (evaluation's resize + centre crop) get a plain full-size decode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from barlow.data.decode import JpegFrame, decode_image, decode_pixels, draft_scale, image_size, open_image
from barlow.data.handover import Lease

Box = tuple[int, int, int, int]  # a crop box: top, left, height, width (a plain tuple: drawn per image, per view)

# conversions that may run before the crop: they commute with it (mode / type changes only)
_BEFORE_CROP_OK = {"ToImage", "PILToTensor"}


class CropFirstError(ValueError):
    """A transform whose crop cannot move before decoding (an op before RandomResizedCrop that is not a conversion)."""


class SplitView:
    """One view split at its RandomResizedCrop: the conversions before it, the crop, and the ops after it."""

    def __init__(self, before: list[Callable], crop: v2.RandomResizedCrop, after: list[Callable]):
        self.before, self.crop, self.after = before, crop, after
        self.out_h, self.out_w = crop.size

    def draw_box(self, img: Image.Image) -> Box:
        """The crop's box on an opened image's full size (the crop's own make_params: its RNG, its distribution)."""
        p = self.crop.make_params([img])
        return p["top"], p["left"], p["height"], p["width"]

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


def split_view(view: Any) -> SplitView | None:
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
    return SplitView(ops[:crops[0]], ops[crops[0]], ops[crops[0] + 1:])


class CropFirst:
    """`transform(image)` computed from JPEG bytes with crop-before-decode; see the module doc."""

    def __init__(self, view: SplitView, channels: int):
        self.view, self.channels = view, channels
        self.last_scale = 1  # the reduction the last image was decoded at (for tests and benchmarks)

    @classmethod
    def wrap(cls, transform: Any, channels: int) -> CropFirst | None:
        """A CropFirst for a Compose with a RandomResizedCrop, None without one; CropFirstError for one whose crop
        cannot go first (see the module doc)."""
        view = split_view(transform)
        return cls(view, channels) if view else None

    def __call__(self, data: bytes, name: str) -> Any:
        img = open_image(data, name)
        v = self.view
        crops = [(v.draw_box(img), v.out_h, v.out_w)]  # the box on the header size: nothing decoded yet
        img, boxes, self.last_scale = decode_for_crops(img, name, self.channels, crops)
        return v.finish(v.convert(img), *boxes[0])


def decode_for_crops(img: Image.Image | JpegFrame, name: str, channels: int, crops: list[tuple[Box, int, int]],
                     data: bytes | None = None) -> tuple[Any, list[Box], int]:
    """Decode an opened image (or a JPEG known by its frame header) for crops `(box on the full size, out_h,
    out_w)`: at the largest JPEG draft reduction that keeps every crop at least its output size. Returns the image
    (PIL; with `data`, the bytes it was opened from, a CHW uint8 tensor via decode.decode_pixels), each box as
    (top, left, height, width) scaled to the decoded size (inside it, at least 1 px), and the reduction."""
    width, height = image_size(img)
    room = min(min(w / out_w, h / out_h) for (_, _, h, w), out_h, out_w in crops)
    scale = next((s for s in (8, 4, 2) if room >= s and draft_scale(width, height, (width // s, height // s)) == s), 1)
    min_size = (width // scale, height // scale) if scale > 1 else None
    if data is None:
        img = decode_image(img, name, channels, min_size)
        dw, dh = img.size
    else:
        img = decode_pixels(data, img, name, channels, min_size)
        dh, dw = img.shape[-2:]
    sx, sy, boxes = dw / width, dh / height, []
    for (top, left, h, w), _, _ in crops:
        top, left = min(round(top * sy), dh - 1), min(round(left * sx), dw - 1)
        boxes.append((top, left, max(1, min(round(h * sy), dh - top)), max(1, min(round(w * sx), dw - left))))
    return img, boxes, scale


@dataclass
class Encoded:
    """A batch for device decoding (decode=gpu): the files' bytes, and per view the crop boxes (top, left, height,
    width on the full-size image) and flips; `barlow.data.devicedecode.decode_views` takes them. Images the GPU
    decoder cannot take (PNG, CMYK, progressive JPEG: told from the header) were decoded and cropped by the loader
    workers already: `host_index` lists them, `host_views` holds their uint8 crops per view, their bytes are empty.
    The bytes travel as one tensor: from a loader worker, in one of its reused buffers (barlow.data.handover), given
    back by `pin_memory` once copied, or by whoever reads them last (`release`)."""

    blob: torch.Tensor  # uint8, 1-D: every file as stored, one after the other
    sizes: list[int]  # bytes per sample
    boxes: torch.Tensor  # (views, B, 4) int64
    flips: torch.Tensor  # (views, B) bool
    names: list[str]  # for the message when an image turns out undecodable on the device
    host_index: torch.Tensor  # (K,) int64: the samples decoded on the host
    host_views: tuple[torch.Tensor, torch.Tensor]  # (K, C, size, size) uint8 per view
    lease: Lease | None = None  # the loader worker's buffer `blob` is in, until released

    def __reduce__(self):
        # sent to the training process: the small tensors inline in the pickle, as a tensor each would cost a
        # shared-memory block and a file descriptor on both sides, more than its bytes
        return _encoded, (self.blob, self.sizes, self.boxes.numpy(), self.flips.numpy(), self.names,
                          self.host_index.numpy(), self.host_views, self.lease)

    @property
    def data(self) -> list[torch.Tensor]:
        """Each sample's bytes (views of `blob`)."""
        return list(self.blob.split(self.sizes))

    def pin_memory(self) -> Encoded:
        """A copy in pinned memory; the worker's buffer is given back (nothing reads it after the copy)."""
        pinned = Encoded(self.blob.pin_memory(), self.sizes, self.boxes, self.flips, self.names,
                         self.host_index.pin_memory(), tuple(v.pin_memory() for v in self.host_views))
        self.release()
        return pinned

    def release(self) -> None:
        """Give `blob`'s buffer back to its loader worker: call once nothing will read the bytes again."""
        if self.lease is not None:
            self.lease.release(mapped=self.blob.untyped_storage())
            self.lease = None


def _encoded(blob, sizes, boxes, flips, names, host_index, host_views, lease) -> Encoded:
    return Encoded(blob, sizes, torch.from_numpy(boxes), torch.from_numpy(flips), names, torch.from_numpy(host_index),
                   host_views, lease)
