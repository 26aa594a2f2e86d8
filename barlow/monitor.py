"""Quality while pretraining runs: an online linear probe on the training batches, a periodic kNN top-1, and a
label-free rank monitor (RankMe and near-constant dimensions on a fixed sample).

Both only read the backbone. The probe trains on view 1's pooled backbone features, which the model's forward
returns detached, with its own optimizer (and, with several processes, its own DDP, so its gradients are averaged
across ranks and the backbone's DDP never sees it). The kNN runs the backbone in eval mode under no_grad on fixed
label subsets of the validation and training images (eval transform), with evaluate.py's feature and kNN functions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from barlow import runsetup
from barlow.augment import ImageTransform, eval_transform
from barlow.data import open_source
from barlow.errors import SplitsDisagree, UnlabelledData
from barlow.evaluate import features_of, knn_dtype, knn_top1
from barlow.spec import DataSpec, PretrainSpec

SUBSETS = (1, 10, 100)  # the label subsets every source serves (see barlow.data.source)


def probe_enabled(setting: str, num_classes: int) -> bool:
    """monitor.online_probe for data with `num_classes` classes: auto is on when there is more than one."""
    if setting == "on" and num_classes < 2:
        raise UnlabelledData(f"monitor.online_probe: on needs labelled data, data.train has {num_classes} class "
                         f"(use auto or off)")
    return setting == "on" or (setting == "auto" and num_classes > 1)


class OnlineProbe:
    """A linear classifier on detached backbone features, trained on each training batch's labels.

    BatchNorm without affine parameters in front of the linear layer (as MAE's linear probe) keeps one learning
    rate right while the backbone's feature scale drifts during pretraining. `top1` counts the predictions made on
    each batch before the probe learns from it, so it measures features the probe has not been fitted to yet.
    """

    def __init__(self, feature_dim: int, num_classes: int, lr: float, device: torch.device, world_size: int = 1):
        self.head = nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, num_classes)).to(device)
        # Its own DDP: rank 0's initial weights everywhere, gradients averaged; batch statistics stay per rank.
        self.trained = (DistributedDataParallel(self.head, gradient_as_bucket_view=True, **runsetup.ddp_buffer_sync(False))
                        if world_size > 1 else self.head)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=lr, momentum=0.9)
        self.hits = torch.zeros((), device=device)  # since the last `take`, on the device
        self.seen = torch.zeros((), device=device)

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """One SGD step on a batch; queues device work only (no host sync)."""
        logits = self.trained(features.float())
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.hits += (logits.detach().argmax(dim=1) == labels).sum()
        self.seen += labels.numel()

    def counts(self) -> list[torch.Tensor]:
        """This rank's (correct, predicted) since the last `reset`, still on the device."""
        return [self.hits, self.seen]

    def reset(self) -> None:
        self.hits.zero_()
        self.seen.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])


def smallest_subset(source: Any, images: int) -> int:
    """The smallest label subset (percent) of a source that holds at least `images` images (100: all of them)."""
    return next((p for p in SUBSETS if source.count(p) >= images), 100)


def knn_due(step: int, steps_per_epoch: int, total_steps: int, every: int) -> bool:
    """Whether optimizer step `step` ends an epoch that is a multiple of `every`, or is the last step."""
    return step == total_steps or (step % steps_per_epoch == 0 and (step // steps_per_epoch) % every == 0)


class KnnMonitor:
    """kNN top-1 of the backbone's features every `every` epochs and at the last step, on fixed subsets:
    the validation images of `monitor.knn_images` against the training images of `monitor.knn_train_images`."""

    def __init__(self, spec: PretrainSpec, proc: runsetup.Process, train_source: Any, every: int,
                 data: DataSpec | None = None):
        """`data`: the labelled set (default data.*); `train_source`: its train images when already open."""
        m, d, place = spec.monitor, data or spec.data, proc.place
        self.every, self.k, self.proc, self.workers = every, m.knn_k, proc, d.workers
        self.train = train_source if train_source is not None else open_source(d, "train")
        self.val = open_source(d, "val")
        field = "monitor.data" if d is not spec.data else "data"
        if not self.train.classes:
            raise UnlabelledData(f"{field}.train: {d.train} is {self.train.describe()}: the kNN needs labelled images")
        if self.val.classes != self.train.classes:
            raise SplitsDisagree(f"{field}.val: its classes differ from {field}.train's (the kNN monitor compares them)")
        self.num_classes = len(self.train.classes)
        self.train_percent = smallest_subset(self.train, m.knn_train_images)
        self.val_percent = smallest_subset(self.val, m.knn_images)
        self.per_rank = max(1, spec.optim.batch_size // place.world_size)
        self.transform = ImageTransform(eval_transform(d.image_size, d.channels), d.channels)

    def describe(self) -> str:
        return (f"kNN every {self.every} epoch(s) on {self.val.count(self.val_percent)} val against "
                f"{self.train.count(self.train_percent)} train images")

    def due(self, step: int, steps_per_epoch: int, total_steps: int) -> bool:
        return knn_due(step, steps_per_epoch, total_steps, self.every)

    def measure(self, backbone: nn.Module) -> float:
        """kNN top-1 (percent) over every rank's share of the validation subset; the backbone's mode is restored."""
        was_training = backbone.training
        backbone.eval()  # running BatchNorm statistics, as an evaluation uses them
        try:
            with torch.random.fork_rng(devices=[]):  # the loaders' seeds leave the run's RNG as it was
                dtype = knn_dtype(self.proc.place.device)
                val = features_of(backbone, self.val, self.transform, self.per_rank, self.proc, self.workers,
                                  self.val_percent, dtype)
                train = features_of(backbone, self.train, self.transform, self.per_rank, self.proc, self.workers,
                                    self.train_percent, dtype)
        finally:
            backbone.train(was_training)
        return knn_top1(*train, *val, self.k, self.num_classes)  # sharded: no rank gathers the others' features


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


class RankMonitor:
    """Label-free quality every `every` epochs and at the last step, measured on the main rank only: RankMe of the
    backbone features and of the projector output on a fixed sample of training images (eval transform, read once at
    the start and held on the host), and the fraction of near-constant projector dimensions.

    A monitor's small protocol (so monitors can become a list): `due(step, ...)`, `observe(batch)` (nothing here),
    `measure(model) -> dict of scalars`, `state_dict()` (nothing to checkpoint here)."""

    def __init__(self, spec: PretrainSpec, proc: runsetup.Process, source: Any, every: int, projector_dim: int):
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
        return knn_due(step, steps_per_epoch, total_steps, self.every)

    def observe(self, batch: Any) -> None:
        """Nothing per batch: the measurement uses its fixed sample."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def measure(self, model: nn.Module, chunk: int = 128) -> dict[str, float]:
        """The scalars of one measurement (empty on the other ranks); the model's mode is restored."""
        if self.sample is None:
            return {}
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
                "collapse_below": self.collapse_below}
