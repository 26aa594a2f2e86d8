"""The device half of BYOL's views, batched on the training device with per-sample random parameters.

forward(x1, x2, seed): uint8 (B, C, size, size) crops (cropped, resized and flipped on the host) -> two float32
views, normalised, channels-last, on the input's device. Pixels are floats on [0, 1] throughout (what torchvision's
functional ops compute on float images). Each op is a broadcast tensor op following
torchvision.transforms.v2.functional._color's formulas with per-sample factors, tested against those functionals
sample by sample. Library choice: kornia 0.9 draws one ColorJitter op order per batch (not per sample) from the
global RNG; torchaug 0.6.1 (per-sample batched ops) requires torchvision<0.20.

Parameters come from a CPU generator seeded by (seed, view): CPU and CUDA draw the same, a resume replays them, and
every choice about which samples an op touches is made on the host (no device sync). Inside the step no tensor is
built from Python data on the device: constants are module buffers, and per-sample values cross from pinned host
memory with non-blocking copies (`to_device`).

Imports nothing of barlow.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from barlow.augment.views import BLUR_SIGMA, JITTER_OPS, SOLARIZE_THRESHOLD, ViewsConfig

CPU_CHUNK_PIXELS = 8 * 224 * 224  # images per chunk on the CPU: this many pixels (8 at 224 px, 392 at 32 px)
SOLARIZE_FLOAT = SOLARIZE_THRESHOLD / 255  # on [0, 1] floats: the same pixels as 128 on uint8 ones
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
_HUE_SECTORS = (5.0, 3.0, 1.0)  # n_c of adjust_hue's closed form, per channel (R, G, B)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: from pinned memory, non-blocking (pageable memory would make
    CUDA stage the copy, which may synchronise the stream)."""
    if device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


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

    FACTORS = ("brightness", "contrast", "saturation", "hue", "sigma")

    def __len__(self) -> int:
        return self.jitter.shape[0]

    def rows(self, start: int, stop: int) -> ViewParams:
        """The parameters of samples start..stop-1."""
        return ViewParams(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})

    def factors_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The float factors on `device`, in one copy."""
        packed = to_device(torch.stack([getattr(self, k) for k in self.FACTORS]), device)
        return dict(zip(self.FACTORS, packed.unbind(0), strict=True))


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
    h6 = h6.add_(6.0 * f.view(-1, 1, 1))
    k = torch.empty_like(x)
    for c, n in enumerate(_HUE_SECTORS):  # Python scalars: no constant tensor to build on the device
        torch.add(h6, n, out=k[:, c])
    k = k.sub_(torch.floor(k / 6.0).mul_(6.0))  # mod 6 (remainder_ is slower on the CPU)
    k = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (maxc.unsqueeze(1) - crange.unsqueeze(1) * k).clamp_(0.0, 1.0)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """RandomGrayscale's op: luma, kept as 3 channels."""
    return _gray(x).expand_as(x).contiguous()  # a real tensor: later ops write rows into it


def _reflect(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Reflect padding along one dim (F.pad's "reflect": the edge pixel is not repeated), ~5x faster on the CPU."""
    n = x.shape[dim]
    return torch.cat((x.narrow(dim, 1, pad).flip(dim), x, x.narrow(dim, n - 1 - pad, pad).flip(dim)), dim=dim)


def blur_offsets(kernel_size: int) -> torch.Tensor:
    """The kernel's tap offsets from its centre (a CPU constant; DeviceViews keeps it as a buffer)."""
    return torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2


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


def solarize(x: torch.Tensor) -> torch.Tensor:
    """where(x >= 128/255, 1 - x, x), as x + m (1 - 2x) with m in {0, 1}: exact on [0, 1], faster than where."""
    return (1.0 - 2.0 * x).mul_(_is(torch.ge, x, SOLARIZE_FLOAT)).add_(x)


class DeviceViews(torch.nn.Module):
    """The device half of a `ViewsConfig` (see the module doc), for whole batches on the training device.

    Per view v: ColorJitter(config.jitter) with p = views[v].jitter_prob in a per-sample random order,
    RandomGrayscale(views[v].grayscale_prob) (3 channels), Gaussian blur p = views[v].blur_prob (sigma ~ U[0.1, 2],
    kernel config.kernel_size, reflect padding), solarize p = views[v].solarize_prob, normalise.
    """

    hue_op = staticmethod(adjust_hue)  # torchvision's HSV hue

    def __init__(self, config: ViewsConfig):
        super().__init__()
        self.config = config
        mean, std = config.mean_std
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("blur_offsets", blur_offsets(config.kernel_size), persistent=False)

    def draw_view(self, batch_size: int, seed: int, view: int) -> ViewParams:
        """View `view`'s (0 or 1) parameters for a batch, from a CPU generator seeded by (seed, view)."""
        g = torch.Generator().manual_seed(_seed_for(seed, view))
        v, (b, c, s, h) = self.config.views[view], self.config.jitter
        return ViewParams(
            jitter=torch.rand(batch_size, generator=g) < v.jitter_prob,
            order=torch.rand(batch_size, len(JITTER_OPS), generator=g).argsort(dim=1),
            brightness=_uniform(batch_size, 1 - b, 1 + b, g),
            contrast=_uniform(batch_size, 1 - c, 1 + c, g),
            saturation=_uniform(batch_size, 1 - s, 1 + s, g),
            hue=_uniform(batch_size, -h, h, g),
            gray=(torch.rand(batch_size, generator=g) < v.grayscale_prob) & (self.config.channels == 3),
            blur=torch.rand(batch_size, generator=g) < v.blur_prob,
            sigma=_uniform(batch_size, *BLUR_SIGMA, g),
            solarize=torch.rand(batch_size, generator=g) < v.solarize_prob,
        )

    def draw(self, batch_size: int, seed: int) -> tuple[ViewParams, ViewParams]:
        """Both views' parameters for a batch (independent: each view has its own stream)."""
        return self.draw_view(batch_size, seed, 0), self.draw_view(batch_size, seed, 1)

    @staticmethod
    def _on(x: torch.Tensor, mask: torch.Tensor, op, *factors: torch.Tensor) -> torch.Tensor:
        """x with op applied to the samples where mask (on the CPU) is True, in place of those rows; factors are
        (B,) on x's device."""
        if not bool(mask.any()):
            return x
        if bool(mask.all()):
            return op(x, *(f.view(-1, 1, 1, 1) for f in factors))
        idx = to_device(mask.nonzero().squeeze(1), x.device)
        args = [f[idx].view(-1, 1, 1, 1) for f in factors]
        return x.index_copy_(0, idx, op(x.index_select(0, idx), *args))  # x is apply_view's own copy

    def apply_view(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """One view on a uint8 (or [0, 1] float) batch with given parameters -> normalised float32, channels-last."""
        if x.ndim != 4 or x.shape[1] != self.config.channels:
            raise ValueError(f"views: expected a (B, {self.config.channels}, H, W) batch (got {tuple(x.shape)})")
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
        f = p.factors_on(x.device)
        ops = ((adjust_brightness, f["brightness"]), (adjust_contrast, f["contrast"]),
               (adjust_saturation, f["saturation"]), (self.hue_op, f["hue"]))
        for step in range(len(ops)):  # step k applies each sample's k-th op: each op once per sample, in its own order
            for op_index, (op, factor) in enumerate(ops):
                x = self._on(x, p.jitter & (p.order[:, step] == op_index), op, factor)
        if self.config.channels == 3:
            x = self._on(x, p.gray, grayscale)
        kernel_size, offsets = self.config.kernel_size, self.blur_offsets
        x = self._on(x, p.blur, lambda t, s: gaussian_blur(t, kernel_size, s, offsets), f["sigma"])
        x = self._on(x, p.solarize, solarize)
        return x.sub_(self.mean).div_(self.std)

    def apply(self, x1: torch.Tensor, x2: torch.Tensor,
              params: tuple[ViewParams, ViewParams]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply_view(x1, params[0]), self.apply_view(x2, params[1])

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if x1.shape != x2.shape:
            raise ValueError(f"views: both batches must have one shape (got {tuple(x1.shape)}, {tuple(x2.shape)})")
        return self.apply(x1, x2, self.draw(x1.shape[0], seed))

    def extra_repr(self) -> str:
        return repr(self.config)
