"""The label-free rank monitor: RankMe (Garrido et al., 2023) of the backbone features and of the projector output,
and the fraction of near-constant projector dimensions, on a fixed sample of training images, every
`monitor.rank_every_epochs` epochs and at the end."""

from __future__ import annotations

import time

import torch
from torch import nn

from barlow import runsetup
from barlow.augment import ImageTransform, eval_transform
from barlow.data.source import Source
from barlow.monitors import Monitor, epoch_due
from barlow.spec import PretrainSpec


def build(spec: PretrainSpec, proc: runsetup.RunContext, source: Source, model: nn.Module) -> Monitor | None:
    """monitor.rank_every_epochs (0: off; unset: within 1 % of training's cost)."""
    every = spec.monitor.rank_every(source.num_samples)
    return RankMonitor(spec, proc, source, every, model.embed_dim) if every else None


def rankme(z: torch.Tensor) -> float:
    """RankMe (Garrido et al., 2023): the exponential of the entropy of the normalised singular values of the n x d
    embeddings `z`; between 1 (every row on one line) and min(n, d) (all directions used equally); 0 for all zeros."""
    s = torch.linalg.svdvals(z.detach().double().cpu())  # float64 on the host: one small matrix per measurement
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def constant_fraction(z: torch.Tensor, relative: float = 1e-2) -> float:
    """The fraction of dimensions whose standard deviation over the rows is below `relative` times the mean one
    (all of them when every dimension is constant)."""
    std = z.detach().double().std(dim=0)
    scale = std.mean()
    return 1.0 if scale <= 0 else float((std < relative * scale).double().mean())


class RankMonitor(Monitor):
    """Label-free quality every `every` epochs and at the last step, measured on the main rank only: RankMe of the
    backbone features and of the projector output on a fixed sample of training images (eval transform, read once at
    the start and held on the host), and the fraction of near-constant projector dimensions."""

    name, KEYS = "rank", ("rankme_projector",)

    def __init__(self, spec: PretrainSpec, proc: runsetup.RunContext, source: Source, every: int, projector_dim: int):
        m, d = spec.monitor, spec.data
        self.every, self.proc, self.images = every, proc, min(m.rank_images, source.num_samples)
        self.collapse_below = m.collapse_fraction * min(projector_dim, self.images)
        self.sample: torch.Tensor | None = None
        if proc.place.is_main:
            transform = ImageTransform(eval_transform(d.image_size, d.channels), d.channels)
            with torch.random.fork_rng(devices=[]):
                batches = source.loader(transform=transform, batch_size=self.images, rank=0, world_size=1, seed=0,
                                        epoch=0, workers=0, shuffle=True, drop_last=True)
                self.sample = next(iter(batches)).inputs.half()  # half: the fixed sample costs half the memory

    def describe(self) -> str:
        return (f"RankMe every {self.every} epoch(s) on {self.images} fixed train images (collapse below "
                f"{self.collapse_below:.1f})")

    def due(self, step: int, steps_per_epoch: int, total_steps: int) -> bool:
        return epoch_due(step, steps_per_epoch, total_steps, self.every)

    @torch.no_grad()
    def measure(self, model: nn.Module, chunk: int = 128) -> dict[str, float]:
        """The scalars of one measurement and its seconds (empty on the other ranks); the model's mode is restored."""
        if self.sample is None:
            return {}
        started = time.perf_counter()
        was_training = model.training
        model.eval()  # running BatchNorm statistics: the sample's own batch statistics would hide a collapse
        device = self.proc.place.device
        try:
            feats, projected = [], []
            for x in self.sample.split(chunk):
                with self.proc.autocast():
                    h = model.backbone(x.to(device).float())
                    feats.append(h.float())
                    projected.append(model.projector(h).float())
        finally:
            model.train(was_training)
        h, z = torch.cat(feats), torch.cat(projected)
        return {"rankme_features": rankme(h), "rankme_projector": rankme(z), "constant_dims": constant_fraction(z),
                "collapse_below": self.collapse_below, "rank_monitor_s": time.perf_counter() - started}
