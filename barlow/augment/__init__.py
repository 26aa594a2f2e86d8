"""Augmentation, all of it: BYOL's two training views (host half and device half) and the linear-eval transforms.

- `views`: the one views configuration (`ViewsConfig`, built from the spec's `data.augment`): both views side by
  side, per view the host half (crop scale, flip) beside one probability per device op; `HostDraws`, the host
  half's random crop boxes and flips;
- `host`: `HostCrops`, the host half as the loaders' per-sample transform (crop-first decoding: barlow.data.cropfirst);
- `device`: the device half, batched on the training device (`DeviceViews`, `ViewParams`);
- `ops`: the device half's ops, one module each, in the order of `ops.OPS` (jitter, grayscale, blur, solarize);
- `eval_transforms`: the linear-eval train/eval transforms, and `ImageTransform` (one as a loader transform).

To add a view op: its module in `ops/` (see `barlow.augment.ops` for what it defines), its line at the end of
`ops.OPS`, and its probability field in `barlow.spec.AugmentSpec` (the View field, the draws and the ViewParams
fields follow from the module). Of barlow outside this package it imports only barlow.data's host-side decoding
(decode, cropfirst, handover): barlow.data.feed, above it, applies the views on the device.
"""

from barlow.augment.device import CPU_CHUNK_PIXELS, DeviceViews, ViewParams, to_device
from barlow.augment.eval_transforms import ImageTransform, ToImage, eval_transform, normalize, train_transform
from barlow.augment.host import HostCrops
from barlow.augment.ops.blur import BLUR_SIGMA, blur_kernel_size, gaussian_blur
from barlow.augment.ops.grayscale import grayscale
from barlow.augment.ops.jitter import (
    JITTER_OPS,
    Jitter,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
)
from barlow.augment.ops.solarize import SOLARIZE_THRESHOLD, solarize
from barlow.augment.views import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD, Box, HostDraws, View, ViewsConfig

__all__ = [
    "BLUR_SIGMA", "CPU_CHUNK_PIXELS", "GRAY_MEAN", "GRAY_STD", "IMAGENET_MEAN", "IMAGENET_STD", "JITTER_OPS",
    "SOLARIZE_THRESHOLD", "Box", "DeviceViews", "HostCrops", "HostDraws", "ImageTransform", "Jitter", "ToImage", "View",
    "ViewParams", "ViewsConfig", "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation",
    "blur_kernel_size", "eval_transform", "gaussian_blur", "grayscale", "normalize", "solarize", "to_device",
    "train_transform",
]
