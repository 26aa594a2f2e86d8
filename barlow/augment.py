"""BYOL's two asymmetric views for pretraining, and the linear-eval train/eval transforms (torchvision.transforms.v2).

Pixels stay uint8 through every random op (crop, flip, jitter, grayscale, blur, solarize at 128) and become float32
only for the final normalisation. channels=3 normalises with ImageNet's mean/std; channels=1 converts the input to
grayscale first, skips RandomGrayscale (a no-op there; ColorJitter's saturation/hue leave one channel unchanged) and
normalises with mean 0.5, std 0.5.

Imports nothing of barlow.
"""

from __future__ import annotations

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


# replaced by the batched DeviceViews of the device-side branch
class DeviceViews(torch.nn.Module):
    """The device half of BYOL's two views: colour jitter, grayscale, blur, solarize, normalise on uint8 crops that
    are already cropped, resized and flipped (the host half: barlow.data.cropfirst.HostCrops).

    Minimal correct stand-in: today's byol_view ops after the flip, applied one sample at a time with parameters
    drawn from the int `seed`; the batched module of the device-side branch replaces it with the same interface.
    """

    def __init__(self, size: int, channels: int = 3, jitter_prob: float = 0.8, grayscale_prob: float = 0.2,
                 blur_prob: tuple[float, float] = (1.0, 0.1), solarize_prob: tuple[float, float] = (0.0, 0.2),
                 hue: str = "hsv"):
        super().__init__()
        _check(size, channels)
        if hue != "hsv":
            raise ValueError(f"hue: only hsv in this stand-in (got {hue!r})")
        self.size, self.channels = size, channels

        def view(blur: float, solarize: float) -> v2.Compose:
            ops: list[torch.nn.Module] = [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=jitter_prob)]
            if channels == 3:
                ops.append(v2.RandomGrayscale(grayscale_prob))
            ops += [v2.RandomApply([GaussianBlur(blur_kernel_size(size), sigma=BLUR_SIGMA)], p=blur),
                    v2.RandomSolarize(SOLARIZE_THRESHOLD, p=solarize), *_normalize(channels), v2.ToPureTensor()]
            return v2.Compose(ops)

        self.view1, self.view2 = view(blur_prob[0], solarize_prob[0]), view(blur_prob[1], solarize_prob[1])

    @torch.no_grad()
    def views(self, x1: torch.Tensor, x2: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two float views (normalised, channels_last, on the input's device) of uint8 (B, C, size, size) crops."""
        if x1.dtype != torch.uint8 or x1.shape != x2.shape or tuple(x1.shape[1:]) != (self.channels, self.size, self.size):
            raise ValueError(f"views: expected two uint8 (B, {self.channels}, {self.size}, {self.size}) batches "
                             f"(got {x1.dtype} {tuple(x1.shape)}, {x2.dtype} {tuple(x2.shape)})")
        out1, out2 = [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed % (2**63 - 1))
            for a, b in zip(x1, x2, strict=True):
                out1.append(self.view1(tv_tensors.Image(a)))
                out2.append(self.view2(tv_tensors.Image(b)))
        return tuple(torch.stack(o).contiguous(memory_format=torch.channels_last) for o in (out1, out2))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.views(x1, x2, seed)
