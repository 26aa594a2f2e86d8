"""An ImageNet-style folder (`<root>/<class>/<image>`) at any fsspec URL, served as deterministic batches."""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from barlow import storage
from barlow.data.decode import CorruptImage, decode_image
from barlow.spec import DataSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def per_sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one sample in one epoch: independent of workers, ranks and resumes."""
    return (seed * 1_000_003 + epoch * 10_007 + index) % (2**63 - 1)


class _Images(Dataset):
    def __init__(self, fs: Any, files: list[tuple[str, int]], transform: Callable, channels: int, on_corrupt: str,
                 seed: int, epoch: int):
        self.fs, self.files, self.transform, self.channels = fs, files, transform, channels
        self.on_corrupt, self.seed, self.epoch = on_corrupt, seed, epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        skipped = 0
        for attempt in range(len(self.files)):  # a corrupt file is replaced by the next readable one
            path, label = self.files[(index + attempt) % len(self.files)]
            try:
                with self.fs.open(path, "rb") as f:
                    img = decode_image(f.read(), path, self.channels)
            except (CorruptImage, OSError) as e:
                if self.on_corrupt == "fail":
                    raise CorruptImage(str(e)) from None
                skipped += 1
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(per_sample_seed(self.seed, self.epoch, index))
                return self.transform(img), label, skipped
        raise CorruptImage("no readable image in the data set")


def _collate(samples: list) -> tuple[Any, torch.Tensor, int]:
    inputs, labels = default_collate([(s[0], s[1]) for s in samples])
    return inputs, labels, sum(s[2] for s in samples)


class ImageFolderSource:
    """Images in `<root>/<class>/<file>`; classes are the sorted folder names."""

    def __init__(self, url: str, data: DataSpec):
        self.url, self.data = url, data
        self.fs, root = storage.filesystem(url)
        if not self.fs.isdir(root):
            raise FileNotFoundError(f"{url}: no such image folder")
        found = [p for p in self.fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES)]
        by_class: dict[str, list[str]] = {}
        for p in found:
            rel = posixpath.relpath(p, root.rstrip("/") or "/")
            if rel.count("/") == 1:  # only <class>/<file>; deeper files are not part of the layout
                by_class.setdefault(rel.split("/")[0], []).append(p)
        if not by_class:
            raise FileNotFoundError(f"{url}: no images in <class>/<image> layout")
        self.classes = sorted(by_class)
        self.files = [(p, i) for i, c in enumerate(self.classes) for p in sorted(by_class[c])]
        self.num_samples = len(self.files)

    def subset(self, percent: int) -> list[int]:
        """A deterministic per-class sample of `percent` % of the images (at least one per class)."""
        if percent >= 100:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(1234)  # fixed: the same labelled subset for every run
        chosen = []
        for label in range(len(self.classes)):
            idx = [i for i, (_, y) in enumerate(self.files) if y == label]
            keep = max(1, round(len(idx) * percent / 100))
            chosen += [idx[j] for j in torch.randperm(len(idx), generator=g)[:keep].tolist()]
        return sorted(chosen)

    def loader(self, *, transform: Callable, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
               start_step: int = 0, workers: int = 0, shuffle: bool = True, drop_last: bool = True,
               subset_percent: int = 100) -> Iterable[tuple[Any, torch.Tensor, int]]:
        """Batches of `(inputs, labels, n_corrupt)` for one epoch on one rank.

        drop_last (training): exactly `n // (batch_size * world_size) - start_step` full batches on every rank,
        from a permutation seeded by (seed, epoch); resuming at `start_step` serves the same remaining batches.
        Otherwise (evaluation): every sample exactly once across ranks, the last batch may be short.
        """
        indices = torch.tensor(self.subset(subset_percent))
        if shuffle:
            g = torch.Generator().manual_seed(seed * 7919 + epoch)
            indices = indices[torch.randperm(len(indices), generator=g)]
        if drop_last:
            global_batch = batch_size * world_size
            steps = len(indices) // global_batch
            steps_view = indices[: steps * global_batch].view(steps, world_size, batch_size)
            batches = steps_view[start_step:, rank].tolist()
        else:
            mine = indices[rank::world_size].tolist()
            batches = [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]
        dataset = _Images(self.fs, self.files, transform, self.data.channels, self.data.on_corrupt, seed, epoch)
        return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                          persistent_workers=False, prefetch_factor=4 if workers else None)
