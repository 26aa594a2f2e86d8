"""The linear-eval transforms (torchvision.transforms.v2): one float32 tensor per image; `ImageTransform` runs such
a per-image transform as the loaders' per-sample transform, crop-first (barlow.data.cropfirst) where it can.

channels=3 normalises with ImageNet's mean/std; channels=1 converts the input to grayscale first and normalises
with mean 0.5, std 0.5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

from barlow.augment.views import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD
from barlow.data.cropfirst import CropFirst
from barlow.data.decode import decode_image


def check_size(size: int, channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels: must be 1 or 3 (got {channels})")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size: must be a positive integer (got {size!r})")


class ToImage(torch.nn.Module):
    """PIL image (any mode) or uint8 CxHxW tensor -> uint8 tv_tensors.Image with `channels` channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, img):
        if isinstance(img, Image.Image):
            mode = "L" if self.channels == 1 else "RGB"
            return v2.functional.to_image(img if img.mode == mode else img.convert(mode))
        if isinstance(img, torch.Tensor) and img.ndim == 3 and img.shape[0] in (1, 3):
            img = v2.functional.to_image(img)
            if img.shape[0] == self.channels:
                return img
            return v2.functional.rgb_to_grayscale(img) if self.channels == 1 else img.expand(3, -1, -1)
        raise TypeError(f"image: expected a PIL image or a CxHxW tensor with 1 or 3 channels (got {type(img).__name__})")

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def normalize(channels: int) -> list[v2.Transform]:
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GRAY_MEAN, GRAY_STD)
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def train_transform(size: int = 224, channels: int = 3) -> v2.Compose:
    """Linear-eval training: RandomResizedCrop + horizontal flip + normalise; returns one float32 tensor."""
    check_size(size, channels)
    return v2.Compose([ToImage(channels), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                       *normalize(channels), v2.ToPureTensor()])


def eval_transform(size: int = 224, channels: int = 3) -> v2.Compose:
    """Evaluation: Resize(round(size * 256 / 224)) + CenterCrop(size) + normalise; returns one float32 tensor."""
    check_size(size, channels)
    return v2.Compose([ToImage(channels), v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size),
                       *normalize(channels), v2.ToPureTensor()])


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
