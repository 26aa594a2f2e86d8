"""Gaussian blur with probability `blur_prob` (BYOL: 1.0 in view 1, 0.1 in view 2), sigma ~ U(BLUR_SIGMA) per sample,
a kernel of about 10% of the image side, reflect padding: v2.functional.gaussian_blur with a per-sample sigma."""

from __future__ import annotations

import torch

from barlow.augment.ops import mask, uniform

PROB = "blur_prob"
DEFAULTS = (1.0, 0.1)
PARAMS = ("blur", "sigma")
FACTORS = ("sigma",)

BLUR_SIGMA = (0.1, 2.0)


def draw(n: int, p: float, config, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    return mask(n, p, g), uniform(n, *BLUR_SIGMA, g)


def buffers(config) -> dict[str, torch.Tensor]:
    return {"blur_offsets": blur_offsets(config.kernel_size)}


def apply(views, x: torch.Tensor, p, f: dict[str, torch.Tensor]) -> torch.Tensor:
    kernel_size, offsets = views.config.kernel_size, views.blur_offsets
    return views.on(x, p.blur, lambda t, s: gaussian_blur(t, kernel_size, s, offsets), f["sigma"])


def blur_kernel_size(size: int) -> int:
    """About 10% of the image side, odd, at least 3 (23 for 224 px, as in BYOL)."""
    return max(3, round(0.1 * size) | 1)


def blur_offsets(kernel_size: int) -> torch.Tensor:
    """The kernel's tap offsets from its centre (a CPU constant; DeviceViews keeps it as a buffer)."""
    return torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2


def _reflect(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Reflect padding along one dim (F.pad's "reflect": the edge pixel is not repeated), ~5x faster on the CPU."""
    n = x.shape[dim]
    return torch.cat((x.narrow(dim, 1, pad).flip(dim), x, x.narrow(dim, n - 1 - pad, pad).flip(dim)), dim=dim)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """v2.functional.gaussian_blur with a per-sample sigma (same in x and y): reflect padding, torchvision's kernel,
    as two 1-D depthwise convolutions (one group per sample and channel). `offsets`: blur_offsets(kernel_size) on
    x's device (made on the CPU when not given)."""
    n, c, h, w = x.shape
    pad = kernel_size // 2
    if h <= pad or w <= pad:
        raise ValueError(f"size: {h}x{w} is too small for a {kernel_size}-pixel blur with reflect padding")
    offsets = blur_offsets(kernel_size) if offsets is None else offsets
    kernel = torch.softmax(-offsets.pow(2) / (2 * sigma.view(-1, 1).float() ** 2), dim=1)  # (n, k), sums to 1
    kernel = kernel.repeat_interleave(c, dim=0)  # (n * c, k)
    y = x.reshape(1, n * c, h, w)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # full float32 on CUDA, as on the CPU
        y = torch.nn.functional.conv2d(_reflect(y, pad, -1), kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
        y = torch.nn.functional.conv2d(_reflect(y, pad, -2), kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)
