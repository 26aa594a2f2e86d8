"""The host half of the training views as the loaders' per-sample transform (`barlow.data.source.SampleTransform`:
bytes + name in, a sample out, reseeded per batch, collated by the transform itself): `HostCrops` draws each image's
crop boxes and flips (`HostDraws`), has them decoded crop-first (barlow.data.cropfirst) and resizes and flips them,
or with decode=gpu hands the bytes, boxes and flips to the device decoder; the rest of the views runs batched on the
training device (`barlow.augment.DeviceViews`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from PIL import Image
from torch.nn.functional import interpolate

from barlow.augment.views import ViewsConfig
from barlow.data.cropfirst import Box, Encoded, decode_for_crops
from barlow.data.decode import JpegFrame, gpu_takes, image_size, jpeg_frame, open_image
from barlow.data.handover import buffer, shared_tensor


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
