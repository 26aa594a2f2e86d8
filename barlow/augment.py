"""BYOL's two asymmetric views for pretraining, and the linear-eval train/eval transforms (torchvision.transforms.v2).

Two forms of the same views:
- per sample, on the host (TwoViews, byol_view): pixels stay uint8 through every random op (crop, flip, jitter,
  grayscale, blur, solarize at 128) and become float32 only for the final normalisation;
- batched, on the training device (DeviceViews): the host only crops, resizes and flips (uint8,
  barlow.data.cropfirst.HostCrops); DeviceViews runs the rest on a whole batch with per-sample random parameters, in float32 on
  [0, 1] (what torchvision's functional ops compute on float images), with each op written as a broadcast tensor op
  following torchvision.transforms.v2.functional and tested against it sample by sample. kornia (one ColorJitter
  order per batch, global RNG) and torchaug (needs torchvision < 0.20) did not fit; see the README.
channels=3 normalises with ImageNet's mean/std; channels=1 converts the input to grayscale first, skips
RandomGrayscale (a no-op there; ColorJitter's saturation/hue leave one channel unchanged) and normalises with mean
0.5, std 0.5.

Imports nothing of barlow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128  # on uint8 pixels (0.5 on [0, 1] floats)


def _check(size: int, channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels: must be 1 or 3 (got {channels})")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size: must be a positive integer (got {size!r})")


def blur_kernel_size(size: int) -> int:
    """About 10% of the image side, odd, at least 3 (23 for 224 px, as in BYOL)."""
    return max(3, round(0.1 * size) | 1)


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
    """v2.GaussianBlur (same parameters, same sigma draw, same result up to rounding) computed as two matrix products.

    torchvision's 2-D convolution with a 23x23 kernel takes ~60 ms on a 224 px image on one CPU core; this takes ~1 ms,
    which decides whether data loading keeps up with training.
    """

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


class _ToImage(torch.nn.Module):
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


def _normalize(channels: int) -> list[v2.Transform]:
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GRAY_MEAN, GRAY_STD)
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def byol_view(size: int, channels: int, min_scale: float, flip_prob: float, jitter_prob: float, grayscale_prob: float,
              blur_prob: float, solarize_prob: float) -> v2.Compose:
    """One BYOL view: crop, flip, color jitter, grayscale, blur, solarize, normalise."""
    ops: list[torch.nn.Module] = [
        _ToImage(channels),
        v2.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(flip_prob),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=jitter_prob),
    ]
    if channels == 3:
        ops.append(v2.RandomGrayscale(grayscale_prob))
    ops += [
        v2.RandomApply([GaussianBlur(blur_kernel_size(size), sigma=BLUR_SIGMA)], p=blur_prob),
        v2.RandomSolarize(SOLARIZE_THRESHOLD, p=solarize_prob),
        *_normalize(channels),
        v2.ToPureTensor(),
    ]
    return v2.Compose(ops)


class TwoViews:
    """Two differently augmented float32 C x size x size views of one image (BYOL's view 1 and view 2).

    `blur_prob` and `solarize_prob` are (view 1, view 2). `size`, `channels` and `min_scale` are public so a reader
    can decode at reduced resolution (e.g. PIL draft mode) without going below what a crop needs.
    """

    def __init__(self, size: int = 224, channels: int = 3, min_scale: float = 0.08, flip_prob: float = 0.5,
                 jitter_prob: float = 0.8, grayscale_prob: float = 0.2, blur_prob: tuple[float, float] = (1.0, 0.1),
                 solarize_prob: tuple[float, float] = (0.0, 0.2)):
        _check(size, channels)
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale: must be in (0, 1] (got {min_scale})")
        if len(blur_prob) != 2 or len(solarize_prob) != 2:
            raise ValueError("blur_prob, solarize_prob: need one probability per view (two values)")
        for name, value in (("flip_prob", flip_prob), ("jitter_prob", jitter_prob), ("grayscale_prob", grayscale_prob),
                            *((f"blur_prob[{i}]", p) for i, p in enumerate(blur_prob)),
                            *((f"solarize_prob[{i}]", p) for i, p in enumerate(solarize_prob))):
            if not 0 <= value <= 1:
                raise ValueError(f"{name}: must be between 0 and 1 (got {value})")
        self.size, self.channels, self.min_scale = size, channels, min_scale
        common = dict(size=size, channels=channels, min_scale=min_scale, flip_prob=flip_prob,
                      jitter_prob=jitter_prob, grayscale_prob=grayscale_prob)
        self.view1 = byol_view(**common, blur_prob=blur_prob[0], solarize_prob=solarize_prob[0])
        self.view2 = byol_view(**common, blur_prob=blur_prob[1], solarize_prob=solarize_prob[1])

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view1(img), self.view2(img)

    def __repr__(self) -> str:
        return f"TwoViews(\n  view1={self.view1},\n  view2={self.view2})"


def train_transform(size: int = 224, channels: int = 3) -> v2.Compose:
    """Linear-eval training: RandomResizedCrop + horizontal flip + normalise; returns one float32 tensor."""
    _check(size, channels)
    return v2.Compose([_ToImage(channels), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                       *_normalize(channels), v2.ToPureTensor()])


def eval_transform(size: int = 224, channels: int = 3) -> v2.Compose:
    """Evaluation: Resize(round(size * 256 / 224)) + CenterCrop(size) + normalise; returns one float32 tensor."""
    _check(size, channels)
    return v2.Compose([_ToImage(channels), v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size),
                       *_normalize(channels), v2.ToPureTensor()])


# ---------------------------------------------------------------------------------------------------------------
# The batched device views (the part of BYOL's views after crop + flip), for the training device.
#
# Library choice: kornia 0.9 draws one ColorJitter op order per batch (not per sample) from the global RNG; torchaug
# 0.6.1 (per-sample batched ops) requires torchvision<0.20 and cannot sit beside torchvision 0.29.1. So the ops are
# written here as broadcast tensor ops following torchvision.transforms.v2.functional._color's formulas, with
# per-sample factors, and are tested against those functionals sample by sample.
# ---------------------------------------------------------------------------------------------------------------

JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)  # BYOL's ColorJitter strengths
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # the index used in ViewParams.order
CPU_CHUNK_PIXELS = 8 * 224 * 224  # images per chunk on the CPU: this many pixels (8 at 224 px, 392 at 32 px)
SOLARIZE_FLOAT = SOLARIZE_THRESHOLD / 255  # on [0, 1] floats: the same pixels as 128 on uint8 ones
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
# YIQ <-> RGB (NTSC), the linear-RGB hue rotation of DALI / FFCV-SSL
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


@dataclass(frozen=True)
class ViewParams:
    """Per-sample random parameters of one view for a batch of B samples (CPU tensors, shape (B,) unless noted).

    `order[i]` lists sample i's jitter ops in the order applied (indices into JITTER_OPS), as v2.ColorJitter's
    randperm; the four factors are drawn for every sample and used only where `jitter` is True.
    """

    jitter: torch.Tensor  # bool
    order: torch.Tensor  # long (B, 4)
    brightness: torch.Tensor  # float32 in [0.6, 1.4]
    contrast: torch.Tensor  # float32 in [0.6, 1.4]
    saturation: torch.Tensor  # float32 in [0.8, 1.2]
    hue: torch.Tensor  # float32 in [-0.1, 0.1]
    gray: torch.Tensor  # bool (always False for 1 channel)
    blur: torch.Tensor  # bool
    sigma: torch.Tensor  # float32 in [0.1, 2.0]
    solarize: torch.Tensor  # bool

    def __len__(self) -> int:
        return self.jitter.shape[0]

    def rows(self, start: int, stop: int) -> ViewParams:
        """The parameters of samples start..stop-1."""
        return ViewParams(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})


def _mix(z: int) -> int:
    """splitmix64's finaliser: nearby inputs give unrelated 64-bit outputs."""
    z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _seed_for(seed: int, view: int) -> int:
    """A 63-bit seed per (batch seed, view), so the two views' streams are unrelated."""
    return _mix((seed * 2 + view) & 0xFFFFFFFFFFFFFFFF) & 0x7FFFFFFFFFFFFFFF


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high, generator=g)


def _index(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Indices of the True samples on `device` (None: all of them); computed on the CPU, so no device sync."""
    if bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1).to(device, non_blocking=True)


def _per_sample(values: torch.Tensor, idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(B,) CPU factors -> (n, 1, 1, 1) on the device, for the samples in idx."""
    values = values.to(device, non_blocking=True)
    return (values if idx is None else values[idx]).view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luma, torchvision's weights and operation order."""
    r, g, b = x.unbind(dim=1)
    return r.mul(_GRAY_WEIGHTS[0]).add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2]).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend on [0, 1] floats with a per-sample ratio: a * r + b * (1 - r), clamped."""
    return (a * ratio).add_(b * (1.0 - ratio)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    gray = _gray(x) if x.shape[1] == 3 else x
    return _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else _blend(x, _gray(x), f)


def _is(op, a: torch.Tensor, b) -> torch.Tensor:
    """A comparison as a 0/1 float tensor (writing floats directly is ~10x faster on the CPU than bool + where)."""
    return op(a, b, out=torch.empty(torch.broadcast_shapes(a.shape, getattr(b, "shape", ())), device=a.device))


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (RGB -> HSV, h += f mod 1, HSV -> RGB) with a per-sample shift f in [-0.5, 0.5].

    Computed without leaving RGB: the shift keeps each pixel's max and min channel, so with 6h from Pillow's
    formula (torchvision's _rgb_to_hsv) channel c becomes max - (max - min) * clamp(min(k, 4 - k), 0, 1),
    k = (n_c + 6h) mod 6, n = (5, 3, 1): the continuous form of torchvision's (p, q, t) sector table, equal up to
    float rounding, in about a third of the passes over the image and no integer gather.
    """
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    crange = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = (crange + _is(torch.eq, crange, 0.0)).reciprocal_()  # grey pixels: any finite h (crange is 0 there)
    is_r = _is(torch.eq, maxc, r)
    is_g = _is(torch.eq, maxc, g).mul_(1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    h6 = ((g - b) * is_r).add_(((b - r) + 2.0 * crange) * is_g).add_(((r - g) + 4.0 * crange) * is_b).mul_(inv)
    h6 = h6.add_(6.0 * f.view(-1, 1, 1)).unsqueeze(1)
    k = h6 + torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = k.sub_(torch.floor(k / 6.0).mul_(6.0))  # mod 6 (remainder_ is slower on the CPU)
    k = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (maxc.unsqueeze(1) - crange.unsqueeze(1) * k).clamp_(0.0, 1.0)


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


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """RandomGrayscale's op: luma, kept as 3 channels."""
    return _gray(x).expand_as(x).contiguous()  # a real tensor: later ops write rows into it


def _reflect(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Reflect padding along one dim (F.pad's "reflect": the edge pixel is not repeated), ~5x faster on the CPU."""
    n = x.shape[dim]
    return torch.cat((x.narrow(dim, 1, pad).flip(dim), x, x.narrow(dim, n - 1 - pad, pad).flip(dim)), dim=dim)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """v2.functional.gaussian_blur with a per-sample sigma (same in x and y): reflect padding, torchvision's kernel,
    as two 1-D depthwise convolutions (one group per sample and channel)."""
    n, c, h, w = x.shape
    pad = kernel_size // 2
    if h <= pad or w <= pad:
        raise ValueError(f"size: {h}x{w} is too small for a {kernel_size}-pixel blur with reflect padding")
    offsets = torch.arange(kernel_size, dtype=torch.float32, device=x.device) - pad
    kernel = torch.softmax(-offsets.pow(2) / (2 * sigma.view(-1, 1).float() ** 2), dim=1)  # (n, k), sums to 1
    kernel = kernel.repeat_interleave(c, dim=0)  # (n * c, k)
    y = x.reshape(1, n * c, h, w)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # full float32 on CUDA, as on the CPU
        y = torch.nn.functional.conv2d(_reflect(y, pad, -1), kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
        y = torch.nn.functional.conv2d(_reflect(y, pad, -2), kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """where(x >= 128/255, 1 - x, x), as x + m (1 - 2x) with m in {0, 1}: exact on [0, 1], faster than where."""
    return (1.0 - 2.0 * x).mul_(_is(torch.ge, x, SOLARIZE_FLOAT)).add_(x)


class DeviceViews(torch.nn.Module):
    """BYOL's two views after crop + flip, for a whole batch on the training device, per-sample random parameters.

    forward(x1, x2, seed): uint8 (B, C, size, size) crops (already cropped, resized and flipped on the host) ->
    two float32 views normalised like TwoViews, channels-last, on the input's device. Per view: ColorJitter(0.4,
    0.4, 0.2, 0.1) with p = jitter_prob in a per-sample random order, RandomGrayscale(grayscale_prob) (3 channels),
    Gaussian blur p = blur_prob[view] (sigma ~ U[0.1, 2], kernel blur_kernel_size(size), reflect padding),
    solarize p = solarize_prob[view] (128 on uint8 = 128/255 on floats), normalise. Pixels are floats on [0, 1]
    throughout (what torchvision's functional ops compute on float images), not rounded to uint8 between ops.
    Parameters come from a CPU generator seeded by (seed, view): CPU and CUDA draw the same, a resume replays them.
    hue="linear" swaps the HSV hue for a YIQ rotation (faster, not torchvision's; an explicit option only).
    compile=True runs the hue op through torch.compile (same result up to float rounding, much faster, compiles once).
    """

    def __init__(self, size: int, channels: int = 3, jitter_prob: float = 0.8, grayscale_prob: float = 0.2,
                 blur_prob: tuple[float, float] = (1.0, 0.1), solarize_prob: tuple[float, float] = (0.0, 0.2),
                 hue: Literal["hsv", "linear"] = "hsv", compile: bool = False):
        super().__init__()
        _check(size, channels)
        if len(blur_prob) != 2 or len(solarize_prob) != 2:
            raise ValueError("blur_prob, solarize_prob: need one probability per view (two values)")
        for name, value in (("jitter_prob", jitter_prob), ("grayscale_prob", grayscale_prob),
                            *((f"blur_prob[{i}]", p) for i, p in enumerate(blur_prob)),
                            *((f"solarize_prob[{i}]", p) for i, p in enumerate(solarize_prob))):
            if not 0 <= value <= 1:
                raise ValueError(f"{name}: must be between 0 and 1 (got {value})")
        if hue not in ("hsv", "linear"):
            raise ValueError(f"hue: must be 'hsv' or 'linear' (got {hue!r})")
        self.size, self.channels, self.hue, self.compile = size, channels, hue, compile
        hue_op = adjust_hue if hue == "hsv" else adjust_hue_linear
        # compile=True fuses the hue op's ~60 passes over the image into one kernel (12x faster on a CPU core); it
        # costs a one-off compile (~45 s on a busy 2-core machine) and needs a C++ compiler (CPU) or Triton (CUDA)
        self._hue_op = torch.compile(hue_op, dynamic=True) if compile else hue_op
        self.jitter_prob, self.grayscale_prob = float(jitter_prob), float(grayscale_prob)
        self.blur_prob, self.solarize_prob = tuple(map(float, blur_prob)), tuple(map(float, solarize_prob))
        self.kernel_size = blur_kernel_size(size)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GRAY_MEAN, GRAY_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def draw_view(self, batch_size: int, seed: int, view: int) -> ViewParams:
        """View `view`'s (0 or 1) parameters for a batch, from a CPU generator seeded by (seed, view)."""
        g = torch.Generator().manual_seed(_seed_for(seed, view))
        b, c, s, h = (JITTER[k] for k in JITTER_OPS)
        return ViewParams(
            jitter=torch.rand(batch_size, generator=g) < self.jitter_prob,
            order=torch.rand(batch_size, 4, generator=g).argsort(dim=1),
            brightness=_uniform(batch_size, 1 - b, 1 + b, g),
            contrast=_uniform(batch_size, 1 - c, 1 + c, g),
            saturation=_uniform(batch_size, 1 - s, 1 + s, g),
            hue=_uniform(batch_size, -h, h, g),
            gray=(torch.rand(batch_size, generator=g) < self.grayscale_prob) & (self.channels == 3),
            blur=torch.rand(batch_size, generator=g) < self.blur_prob[view],
            sigma=_uniform(batch_size, *BLUR_SIGMA, g),
            solarize=torch.rand(batch_size, generator=g) < self.solarize_prob[view],
        )

    def draw(self, batch_size: int, seed: int) -> tuple[ViewParams, ViewParams]:
        """Both views' parameters for a batch (independent: each view has its own stream)."""
        return self.draw_view(batch_size, seed, 0), self.draw_view(batch_size, seed, 1)

    def _on(self, x: torch.Tensor, mask: torch.Tensor, op, *factors: torch.Tensor) -> torch.Tensor:
        """x with op applied to the samples where mask is True (in place of those rows)."""
        if not bool(mask.any()):
            return x
        idx = _index(mask, x.device)
        args = [_per_sample(f, idx, x.device) for f in factors]
        if idx is None:
            return op(x, *args)
        return x.index_copy_(0, idx, op(x.index_select(0, idx), *args))  # x is apply_view's own copy

    def apply_view(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """One view on a uint8 (or [0, 1] float) batch with given parameters -> normalised float32, channels-last."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"views: expected a (B, {self.channels}, H, W) batch (got {tuple(x.shape)})")
        if x.shape[0] != len(p):
            raise ValueError(f"views: batch of {x.shape[0]} but parameters for {len(p)}")
        out = torch.empty(x.shape, device=x.device, memory_format=torch.channels_last)
        # on the CPU, chunks of ~CPU_CHUNK_PIXELS keep each op's temporaries in cache (whole 224 px batches spend
        # most of their time faulting in fresh pages); a GPU takes the batch at once
        step = x.shape[0] if x.device.type != "cpu" else max(1, CPU_CHUNK_PIXELS // (x.shape[2] * x.shape[3]))
        for start in range(0, x.shape[0], step):
            stop = min(start + step, x.shape[0])
            out[start:stop] = self._view(x[start:stop], p.rows(start, stop) if step < x.shape[0] else p)
        return out

    def _view(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        # a copy of our own (the ops below write into it in place)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)
        x = x.contiguous()
        ops = ((adjust_brightness, p.brightness), (adjust_contrast, p.contrast), (adjust_saturation, p.saturation),
               (self._hue_op, p.hue))
        for step in range(4):  # step k applies each sample's k-th op: each op once per sample, in its own order
            for op_index, (op, factor) in enumerate(ops):
                x = self._on(x, p.jitter & (p.order[:, step] == op_index), op, factor)
        if self.channels == 3:
            x = self._on(x, p.gray, grayscale)
        x = self._on(x, p.blur, lambda t, s: gaussian_blur(t, self.kernel_size, s), p.sigma)
        x = self._on(x, p.solarize, solarize)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def apply(self, x1: torch.Tensor, x2: torch.Tensor,
              params: tuple[ViewParams, ViewParams]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply_view(x1, params[0]), self.apply_view(x2, params[1])

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if x1.shape != x2.shape:
            raise ValueError(f"views: both batches must have one shape (got {tuple(x1.shape)}, {tuple(x2.shape)})")
        return self.apply(x1, x2, self.draw(x1.shape[0], seed))

    def extra_repr(self) -> str:
        return (f"size={self.size}, channels={self.channels}, jitter_prob={self.jitter_prob}, "
                f"grayscale_prob={self.grayscale_prob}, blur_prob={self.blur_prob}, "
                f"solarize_prob={self.solarize_prob}, hue={self.hue!r}, compile={self.compile}")
