"""Decode + augment with the random crops chosen before decoding, so JPEGs decode at reduced size when they can.

The loaders' per-sample transforms (`barlow.data.source.SampleTransform`: bytes + name in, a sample out, reseeded
per batch, collated by the transform itself) for both uses:
- `HostCrops`, the training path: the host half of a `barlow.augment.ViewsConfig` (crop boxes, flips; uint8 crops
  at output size with decode=cpu, the bytes with decode=gpu); the rest of the views runs batched on the training
  device (barlow.augment.DeviceViews);
- `ImageTransform`, a per-image transform (linear eval's), run crop-first where it begins with a RandomResizedCrop.

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
from typing import Any, Literal

import torch
from PIL import Image
from torch.nn.functional import interpolate
from torch.utils.data import default_collate
from torchvision.transforms import v2

from barlow.augment import Box, ViewsConfig
from barlow.data.decode import (
    JpegFrame,
    decode_image,
    decode_pixels,
    draft_scale,
    gpu_takes,
    image_size,
    jpeg_frame,
    open_image,
)
from barlow.data.handover import Lease, buffer, shared_tensor

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


class ImageTransform:
    """A per-image transform (a PIL image or tensor in, a tensor out) as a `SampleTransform` of the loaders: crop-first
    where the transform allows (an error where its crop cannot go first, unless crop_first=False), a plain decode
    otherwise; the torch RNG reseeded per batch; samples collated by torch's default_collate."""

    def __init__(self, transform: Callable, channels: int, crop_first: bool = True):
        self.transform, self.channels = transform, channels
        self.fast = CropFirst.wrap(transform, channels) if crop_first else None

    def reseed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def __call__(self, data: bytes, name: str) -> Any:
        if self.fast is not None:
            return self.fast(data, name)
        return self.transform(decode_image(data, name, self.channels))

    def collate(self, samples: list[Any]) -> Any:
        out = default_collate(samples)
        return tuple(out) if isinstance(out, list) else out  # a transform with several outputs: a tuple of batches


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


class HostCrops:
    """The host half of a `ViewsConfig` (crop boxes and flips, `HostDraws`) as the loaders' `SampleTransform`: image
    i since the batch's `reseed` draws from row i of the batch seed's draws.

    decode=cpu: the crops decoded crop-first (JPEG draft at the largest reduction that keeps each crop at least
    the output size), resized (bicubic, antialiased) to size x size uint8 and flipped: `(x1, x2)` per batch.
    decode=gpu: only the bytes, boxes and flips (`Encoded`), the boxes drawn for the whole batch in the collate; the
    same seed gives the same boxes and flips as cpu. An image the GPU decoder cannot take is decoded here as in cpu
    mode, so no decode runs on the training thread.
    """

    def __init__(self, config: ViewsConfig, decode: Literal["cpu", "gpu"] = "cpu"):
        if decode not in ("cpu", "gpu"):
            raise ValueError(f"decode: must be cpu or gpu (got {decode!r})")
        self.config, self.decode = config, decode
        self.size, self.channels = config.size, config.channels
        self.reseed(0)  # reseeded per batch (called by source.build_batch)
        self.last_scale = 1  # the reduction the last image was decoded at (for tests and benchmarks)

    def reseed(self, seed: int) -> None:
        self.draws, self.drawn = self.config.host_draws(seed), 0

    def __call__(self, data: bytes, name: str) -> Any:
        i, self.drawn = self.drawn, self.drawn + 1
        # a JPEG's size comes from its frame header: PIL opens only what that cannot tell (PNG, CMYK, a cut header)
        frame = jpeg_frame(data)
        if self.decode == "gpu" and gpu_takes(frame):  # the GPU path's common case, kept short: it runs per image
            return data, i, frame.width, frame.height, name, None
        img: Image.Image | JpegFrame = frame if frame is not None and frame.components in (1, 3) else open_image(
            data, name)
        width, height = image_size(img)
        boxes, flips = self.draws.one(i, width, height)
        crops = self._crops(data, img, name, boxes, flips)
        return (b"", i, width, height, name, crops) if self.decode == "gpu" else crops

    def _crops(self, data: bytes, img: Image.Image | JpegFrame, name: str, boxes: list[Box],
               flips: list[bool]) -> tuple[torch.Tensor, ...]:
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
            return tuple(torch.stack([s[v] for s in samples], out=shared_tensor((len(samples), *samples[0][v].shape)))
                         for v in (0, 1))
        host = [i for i, s in enumerate(samples) if s[5] is not None]
        empty = torch.empty(0, self.channels, self.size, self.size, dtype=torch.uint8)
        boxes, flips = self.draws.batch(*zip(*[s[1:4] for s in samples], strict=True))
        sizes = [len(s[0]) for s in samples]
        blob, lease = buffer(sum(sizes))
        out, at = memoryview(blob.numpy()), 0
        for s, size in zip(samples, sizes, strict=True):  # the one copy of the bytes on the host
            out[at:at + size] = s[0]
            at += size
        return Encoded(blob, sizes, torch.from_numpy(boxes), torch.from_numpy(flips), [s[4] for s in samples],
                       torch.tensor(host, dtype=torch.long),
                       tuple(torch.stack([samples[i][5][v] for i in host]) if host else empty for v in range(2)), lease)
