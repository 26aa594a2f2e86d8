"""The kNN monitor: kNN top-1 of the backbone's features every `monitor.knn_every_epochs` epochs and at the end, on
fixed label subsets of the validation and training images (eval transform), with barlow.knn's functions: the
backbone runs in eval mode under no_grad and is only read."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from barlow import runsetup
from barlow.augment import ImageTransform, eval_transform
from barlow.data import open_source
from barlow.data.source import Source
from barlow.data.subsets import SUBSET_PERCENTS
from barlow.errors import SplitsDisagree, UnlabelledData
from barlow.knn import features_of, knn_dtype, knn_top1
from barlow.monitors import Monitor, Off, epoch_due
from barlow.spec import DataSpec, PretrainSpec

SUBSETS = (*sorted(SUBSET_PERCENTS), 100)  # the label subsets every source serves, smallest first


def build(spec: PretrainSpec, proc: runsetup.RunContext, source: Source, model: nn.Module) -> Monitor | None:
    """monitor.knn_every_epochs on `knn_data_of`; unlabelled training data without monitor.data: off, said so."""
    data = knn_data_of(spec, source)
    every = spec.monitor.knn_every(data is not None)
    if every and data:
        return KnnMonitor(spec, proc, source if data is spec.data else None, every, data,
                          names_its_data=not source.classes)
    return None if source.classes else Off("kNN off (set monitor.data to a labelled set)")


def knn_data_of(spec: PretrainSpec, source: Source) -> DataSpec | None:
    """The labelled data the kNN measures on: monitor.data, else data.* when data.train has labels and data.val is
    set, else none (the kNN is off)."""
    if spec.monitor.data is not None:
        return spec.monitor.data.over(spec.data)
    return spec.data if source.classes and spec.data.val is not None else None


def smallest_subset(source: Any, images: int) -> int:
    """The smallest label subset (percent) of a source that holds at least `images` images (100: all of them)."""
    return next((p for p in SUBSETS if source.count(p) >= images), 100)


class KnnMonitor(Monitor):
    """kNN top-1 of the backbone's features every `every` epochs and at the last step, on fixed subsets:
    the validation images of `monitor.knn_images` against the training images of `monitor.knn_train_images`."""

    name, KEYS = "knn", ("knn_top1",)

    def __init__(self, spec: PretrainSpec, proc: runsetup.RunContext, train_source: Any, every: int,
                 data: DataSpec | None = None, names_its_data: bool = False):
        """`data`: the labelled set (default data.*); `train_source`: its train images when already open;
        `names_its_data`: the 'monitor:' line says it measures on monitor.data."""
        self.names_its_data = names_its_data
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
                f"{self.train.count(self.train_percent)} train images{' of monitor.data' if self.names_its_data else ''}")

    def due(self, step: int, steps_per_epoch: int, total_steps: int) -> bool:
        return epoch_due(step, steps_per_epoch, total_steps, self.every)

    def measure(self, model: nn.Module) -> dict[str, float]:
        """kNN top-1 (percent) over every rank's share of the validation subset; the backbone's mode is restored."""
        backbone = model.backbone
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
        # sharded: no rank gathers the others' features
        return {"knn_top1": knn_top1(*train, *val, self.k, self.num_classes)}
