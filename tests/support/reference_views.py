"""Reference implementations that only benchmarks and tests compare barlow's data path against (not the library).

- `TwoViews` / `byol_view` / `GaussianBlur`: the per-sample host path, both whole BYOL views in torchvision
  v2 ops per image (uint8 through every random op, float32 only for the normalisation);
- `TwoViewsCropFirst`: `TwoViews` as a loader `SampleTransform`, its two crops drawn before decoding;
- `adjust_hue_linear` and `VariantViews`: the device views with DALI's / FFCV-SSL's linear (YIQ) hue, or with the
  hue op compiled by torch.compile.

Import as `from reference_views import ...` with tests/support on sys.path (pytest: pyproject's pythonpath; the
bench scripts insert it).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from barlow.augment import BLUR_SIGMA, SOLARIZE_THRESHOLD, DeviceViews, View, ViewsConfig, adjust_hue, blur_kernel_size
from barlow.augment.eval_transforms import ToImage, check_size, normalize
from barlow.data.cropfirst import CropFirstError, decode_for_crops, split_view
from barlow.data.decode import open_image


def _blur_matrix(n: int, kernel_size: int, sigma: float) -> torch.Tensor:
    """n x n matrix M with M @ x == 1-D Gaussian convolution of x with reflect padding (torchvision's kernel)."""
    pad = kernel_size // 2
    offsets = torch.arange(kernel_size, dtype=torch.float32) - pad
    kernel = torch.softmax(-offsets.pow(2) / (2 * sigma * sigma), dim=0)
    src = torch.arange(n)[:, None] + torch.arange(kernel_size)[None, :] - pad
    src = src.abs()  # reflect at the start: -1 -> 1
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)  # reflect at the end: n -> n - 2
    return torch.zeros(n, n).scatter_add_(1, src, kernel.expand(n, kernel_size).contiguous())


class GaussianBlur(v2.GaussianBlur):
    """v2.GaussianBlur (same parameters, same sigma draw, same result up to rounding) computed as two matrix products:
    ~1 ms on a 224 px image on one CPU core instead of torchvision's ~60 ms for a 23x23 kernel."""

    def transform(self, inpt, params):
        h, w = inpt.shape[-2:] if isinstance(inpt, torch.Tensor) else (0, 0)
        kw, kh = self.kernel_size
        if h <= kh // 2 or w <= kw // 2:  # too small to reflect-pad, or not a tensor: torchvision's own kernel
            return super().transform(inpt, params)
        sigma_x, sigma_y = params["sigma"]
        out = _blur_matrix(h, kh, sigma_y) @ inpt.float() @ _blur_matrix(w, kw, sigma_x).T
        if not inpt.is_floating_point():
            out = out.round_().clamp_(0, 255).to(inpt.dtype)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def byol_view(size: int, channels: int, view: View, jitter: tuple[float, float, float, float]) -> v2.Compose:
    """One BYOL view per image: crop, flip, color jitter, grayscale, blur, solarize, normalise."""
    ops: list[torch.nn.Module] = [
        ToImage(channels),
        v2.RandomResizedCrop(size, scale=(view.min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(view.flip_prob),
        v2.RandomApply([v2.ColorJitter(*jitter)], p=view.jitter_prob),
    ]
    if channels == 3:
        ops.append(v2.RandomGrayscale(view.grayscale_prob))
    ops += [
        v2.RandomApply([GaussianBlur(blur_kernel_size(size), sigma=BLUR_SIGMA)], p=view.blur_prob),
        v2.RandomSolarize(SOLARIZE_THRESHOLD, p=view.solarize_prob),
        *normalize(channels),
        v2.ToPureTensor(),
    ]
    return v2.Compose(ops)


class TwoViews:
    """Two differently augmented float32 C x size x size views of one image, per sample (the per-sample host path).
    Takes the spec's `data.augment` fields as keyword arguments (their rules are the spec's)."""

    def __init__(self, size: int = 224, channels: int = 3, min_scale: float = 0.08, flip_prob: float = 0.5,
                 jitter_prob: float = 0.8, grayscale_prob: float = 0.2, blur_prob: tuple[float, float] = (1.0, 0.1),
                 solarize_prob: tuple[float, float] = (0.0, 0.2)):
        check_size(size, channels)
        common = dict(min_scale=min_scale, flip_prob=flip_prob, jitter_prob=jitter_prob, grayscale_prob=grayscale_prob)
        self.config = ViewsConfig(size, channels, (View(**common, blur_prob=blur_prob[0], solarize_prob=solarize_prob[0]),
                                                   View(**common, blur_prob=blur_prob[1], solarize_prob=solarize_prob[1])))
        self.size, self.channels, self.min_scale = size, channels, min_scale
        self.view1, self.view2 = (byol_view(size, channels, v, tuple(self.config.jitter)) for v in self.config.views)

    def __call__(self, img) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view1(img), self.view2(img)

    def __repr__(self) -> str:
        return f"TwoViews(\n  view1={self.view1},\n  view2={self.view2})"


class TwoViewsCropFirst:
    """`TwoViews` as a loader SampleTransform: both crop boxes drawn on the header size, one decode at the largest
    JPEG draft reduction that keeps both crops at least the output size, then each view's own kernel and ops."""

    def __init__(self, two: TwoViews):
        views = [split_view(two.view1), split_view(two.view2)]
        if not all(views):
            raise CropFirstError("crop-first decoding: a view without a RandomResizedCrop")
        self.views, self.channels = views, two.channels
        self.last_scale = 1

    def reseed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def __call__(self, data: bytes, name: str) -> Any:
        img = open_image(data, name)
        crops = [(v.draw_box(img), v.out_h, v.out_w) for v in self.views]
        img, boxes, self.last_scale = decode_for_crops(img, name, self.channels, crops)
        converted = self.views[0].convert(img)  # both views begin with the same conversion: once for both
        return tuple(v.finish(converted, *box) for box, v in zip(boxes, self.views, strict=True))

    def collate(self, samples: list[Any]) -> Any:
        return tuple(default_collate(samples))


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def adjust_hue_linear(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Hue as a rotation of the chroma plane in YIQ (DALI, FFCV-SSL): one 3x3 matrix per sample; not torchvision's."""
    if x.shape[1] == 1:
        return x
    theta = f.view(-1).float().cpu() * (-2 * math.pi)  # HSV hue grows R -> Y -> G: clockwise in the I-Q plane
    rot = torch.zeros(theta.shape[0], 3, 3)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = theta.cos(), -theta.sin(), theta.sin(), theta.cos()
    mat = (_YIQ_TO_RGB @ rot @ _RGB_TO_YIQ).to(x.device, non_blocking=True)  # (n, 3, 3), built on the CPU
    # explicit multiply-adds rather than a matmul, so TF32 settings on CUDA do not change the result
    return sum(mat[:, :, j, None, None] * x[:, j:j + 1] for j in range(3)).clamp_(0.0, 1.0)


class VariantViews(DeviceViews):
    """DeviceViews with hue="linear" (YIQ rotation: faster, not torchvision's) and/or compile=True (the hue op
    through torch.compile: same result up to float rounding, a one-off compile, needs a C++ compiler or Triton)."""

    def __init__(self, config: ViewsConfig, hue: Literal["hsv", "linear"] = "hsv", compile: bool = False):
        super().__init__(config)
        if hue not in ("hsv", "linear"):
            raise ValueError(f"hue: must be 'hsv' or 'linear' (got {hue!r})")
        op = adjust_hue if hue == "hsv" else adjust_hue_linear
        self.hue, self.compile = hue, compile
        self.hue_op = torch.compile(op, dynamic=True) if compile else op
