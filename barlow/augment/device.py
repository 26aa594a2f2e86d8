"""The device half of BYOL's views, batched on the training device with per-sample random parameters.

forward(x1, x2, seed): uint8 (B, C, size, size) crops (cropped, resized and flipped on the host) -> two float32
views, normalised, channels-last, on the input's device. Pixels are floats on [0, 1] throughout (what torchvision's
functional ops compute on float images). The ops are `barlow.augment.ops.OPS`, drawn and applied in that order; each
is a broadcast tensor op following torchvision.transforms.v2.functional's formulas with per-sample factors, tested
against those functionals sample by sample. Library choice: kornia 0.9 draws one ColorJitter op order per batch (not
per sample) from the global RNG; torchaug 0.6.1 (per-sample batched ops) requires torchvision<0.20.

Parameters come from a CPU generator seeded by (seed, view): CPU and CUDA draw the same, a resume replays them, and
every choice about which samples an op touches is made on the host (no device sync). Inside the step no tensor is
built from Python data on the device: constants are module buffers, and per-sample values cross from pinned host
memory with non-blocking copies (`to_device`).

Imports nothing of barlow outside barlow.augment.
"""

from __future__ import annotations

from dataclasses import fields, make_dataclass

import torch

from barlow.augment.ops import view_ops
from barlow.augment.ops.jitter import adjust_hue
from barlow.augment.views import ViewsConfig

CPU_CHUNK_PIXELS = 8 * 224 * 224  # images per chunk on the CPU: this many pixels (8 at 224 px, 392 at 32 px)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: from pinned memory, non-blocking (pageable memory would make
    CUDA stage the copy, which may synchronise the stream)."""
    if device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class _Params:
    """ViewParams' methods (its fields are the ops' PARAMS)."""

    FACTORS: tuple[str, ...] = ()

    def __len__(self) -> int:
        return getattr(self, fields(self)[0].name).shape[0]

    def rows(self, start: int, stop: int) -> ViewParams:
        """The parameters of samples start..stop-1."""
        return type(self)(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})

    def factors_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The float factors on `device`, in one copy."""
        if not self.FACTORS:
            return {}
        packed = to_device(torch.stack([getattr(self, k) for k in self.FACTORS]), device)
        return dict(zip(self.FACTORS, packed.unbind(0), strict=True))


ViewParams = make_dataclass("ViewParams", [(name, torch.Tensor) for op in view_ops() for name in op.PARAMS],
                            bases=(_Params,), frozen=True,
                            namespace={"FACTORS": tuple(k for op in view_ops() for k in getattr(op, "FACTORS", ()))})
ViewParams.__module__, ViewParams.__doc__ = __name__, """Per-sample random parameters of one view for a batch of B samples (CPU tensors, shape (B,)
unless noted): each op's PARAMS, in OPS order. The jitter's `order[i]` (long (B, 4)) lists sample i's jitter ops in
the order applied (indices into JITTER_OPS), as v2.ColorJitter's randperm; factors are drawn for every sample and
used only where the op's mask is True."""


def _mix(z: int) -> int:
    """splitmix64's finaliser: nearby inputs give unrelated 64-bit outputs."""
    z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _seed_for(seed: int, view: int) -> int:
    """A 63-bit seed per (batch seed, view), so the two views' streams are unrelated."""
    return _mix((seed * 2 + view) & 0xFFFFFFFFFFFFFFFF) & 0x7FFFFFFFFFFFFFFF


class DeviceViews(torch.nn.Module):
    """The device half of a `ViewsConfig` (see the module doc), for whole batches on the training device.

    Per view v, each op of OPS with p = views[v].<its PROB> (BYOL's: ColorJitter(config.jitter) in a per-sample
    random order, RandomGrayscale (3 channels), Gaussian blur (sigma ~ U[0.1, 2], kernel config.kernel_size, reflect
    padding), solarize), then normalise.
    """

    hue_op = staticmethod(adjust_hue)  # torchvision's HSV hue (the jitter's; a benchmark variant swaps it)

    def __init__(self, config: ViewsConfig):
        super().__init__()
        self.config = config
        mean, std = config.mean_std
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        for op in view_ops():  # the ops' constants: moved with the module, never built on the device
            for name, value in (op.buffers(config) if hasattr(op, "buffers") else {}).items():
                self.register_buffer(name, value, persistent=False)

    def draw_view(self, batch_size: int, seed: int, view: int) -> ViewParams:
        """View `view`'s (0 or 1) parameters for a batch, from a CPU generator seeded by (seed, view): each op draws
        in OPS order."""
        g = torch.Generator().manual_seed(_seed_for(seed, view))
        v, drawn = self.config.views[view], {}
        for op in view_ops():
            drawn.update(zip(op.PARAMS, op.draw(batch_size, getattr(v, op.PROB), self.config, g), strict=True))
        return ViewParams(**drawn)

    def draw(self, batch_size: int, seed: int) -> tuple[ViewParams, ViewParams]:
        """Both views' parameters for a batch (independent: each view has its own stream)."""
        return self.draw_view(batch_size, seed, 0), self.draw_view(batch_size, seed, 1)

    @staticmethod
    def on(x: torch.Tensor, mask: torch.Tensor, op, *factors: torch.Tensor) -> torch.Tensor:
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
        # a copy of our own (the ops write into it in place)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)
        x = x.contiguous()
        f = p.factors_on(x.device)
        for op in view_ops():
            x = op.apply(self, x, p, f)
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
