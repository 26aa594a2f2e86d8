"""BYOL's two views, and the linear-eval transforms.

- `views`: the one views configuration (`ViewsConfig`, built from the spec's `data.augment`): per view the host
  half (crop box, flip; `HostDraws`) beside the device half's probabilities;
- `device`: the device half, batched on the training device (`DeviceViews`);
- `eval_transforms`: the linear-eval train/eval transforms.

To add a view op: its probability in `views.View` (and `barlow.spec.AugmentSpec`), the op and its draw in
`device.DeviceViews`. Imports nothing of barlow.
"""

from barlow.augment.device import (
    CPU_CHUNK_PIXELS,
    DeviceViews,
    ViewParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    grayscale,
    solarize,
    to_device,
)
from barlow.augment.eval_transforms import ToImage, eval_transform, normalize, train_transform
from barlow.augment.views import (
    BLUR_SIGMA,
    GRAY_MEAN,
    GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER_OPS,
    SOLARIZE_THRESHOLD,
    AugmentSettings,
    Box,
    HostDraws,
    Jitter,
    View,
    ViewsConfig,
    blur_kernel_size,
)

__all__ = [
    "BLUR_SIGMA", "CPU_CHUNK_PIXELS", "GRAY_MEAN", "GRAY_STD", "IMAGENET_MEAN", "IMAGENET_STD", "JITTER_OPS",
    "SOLARIZE_THRESHOLD", "AugmentSettings", "Box", "DeviceViews", "HostDraws", "Jitter", "ToImage", "View", "ViewParams", "ViewsConfig",
    "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation", "blur_kernel_size",
    "eval_transform", "gaussian_blur", "grayscale", "normalize", "solarize", "to_device", "train_transform",
]
