"""A folder of images in any layout (class folders, flat, nested by date) at any fsspec URL, served as deterministic
batches; labels by the rule of `barlow.data.listing`.

The contract (listing, keys, label subsets, per-batch seeds, retries, corrupt images) is the one of
`barlow.data.source`; what is particular here is the order: a permutation of the files seeded by (seed, epoch),
cut into global batches, each rank taking its slice of every global batch.

The loader workers start once per set of loader arguments and serve every epoch (persistent workers: the dataset
they hold computes each epoch's order from its keys). They read each file through `barlow.storage` (its own S3
client per process, every read retried on throttling and network errors with the spec's `data.s3` settings); only
an undecodable file counts as corrupt.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from barlow import storage
from barlow.data import register_format
from barlow.data.listing import NoImages, describe, labelled_images, listing_of
from barlow.data.source import HostBatch, PersistentLoader, SampleTransform, build_batch, derive_seed, iter_loader, loader_worker_init
from barlow.data.subsets import key_hash, subset_thresholds
from barlow.spec import DataSpec

_READ_THREADS = 8  # parallel reads per worker on object stores, where each read is a round trip


class _FolderBatches(Dataset):
    """Batch (epoch, start_step, j) of one rank: its files read, then decoded and transformed with the batch's seed.
    Loader workers keep it across epochs (persistent workers), so it computes each epoch's order itself."""

    def __init__(self, files: list[tuple[str, int]], subset: list[int], order: _Order, transform: SampleTransform,
                 data: DataSpec, s3: storage.S3Settings):
        self.files, self.subset, self.order, self.transform = files, subset, order, transform
        self.on_corrupt, self.s3 = data.on_corrupt, s3
        self._epoch: tuple[tuple[int, int], list[list[int]]] | None = None  # the last epoch's batches
        self._pool: ThreadPoolExecutor | None = None  # made in the process that reads (threads do not survive fork)

    def batches(self, epoch: int, start_step: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != (epoch, start_step):
            self._epoch = (epoch, start_step), self.order.batches(self.subset, epoch, start_step)
        return self._epoch[1]

    def _read(self, url: str) -> bytes:
        return storage.read_bytes(url, self.s3)  # transient errors are retried there; they are never "corrupt"

    def __getitem__(self, key: tuple[int, int, int]) -> HostBatch:
        epoch, start_step, j = key
        batch = self.batches(epoch, start_step)[j]
        urls = [self.files[i][0] for i in batch]
        if not urls or storage.is_local(urls[0]):
            blobs = [self._read(u) for u in urls]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="read")
            blobs = list(self._pool.map(self._read, urls))
        items = [(b, u, self.files[i][1]) for b, u, i in zip(blobs, urls, batch, strict=True)]
        return build_batch(items, self.transform, self.on_corrupt,
                           derive_seed("augment", self.order.seed, epoch, self.order.rank, start_step + j))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}


@dataclass(frozen=True)
class _Order:
    """One rank's epochs: a permutation of the subset seeded by (seed, epoch), cut into global batches (training) or
    dealt out round-robin (evaluation)."""

    batch_size: int
    rank: int
    world_size: int
    seed: int
    shuffle: bool
    drop_last: bool

    def batches(self, subset: list[int], epoch: int, start_step: int) -> list[list[int]]:
        indices = torch.tensor(subset, dtype=torch.long)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            indices = indices[torch.randperm(len(indices), generator=g)]
        if self.drop_last:
            global_batch = self.batch_size * self.world_size
            steps = len(indices) // global_batch
            if not 0 <= start_step <= steps:
                raise ValueError(f"start_step: must be in [0, {steps}] for this epoch (got {start_step})")
            return indices[: steps * global_batch].view(steps, self.world_size, self.batch_size)[start_step:, self.rank].tolist()
        mine = indices[self.rank::self.world_size].tolist()
        return [mine[i: i + self.batch_size] for i in range(0, len(mine), self.batch_size)]


class _Keys(Sampler):
    """The batch keys the DataLoader asks its workers for; set per epoch."""

    def __init__(self):
        self.keys: list[tuple[int, int, int]] = []

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


class FolderLoader:
    """One epoch of one rank (what `loader()` returns): iterates a DataLoader whose workers persist across epochs.
    One epoch of a source is iterated at a time."""

    def __init__(self, loader: DataLoader, sampler: _Keys, keys: list[tuple[int, int, int]]):
        self.loader, self.sampler, self.keys = loader, sampler, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[HostBatch]:
        self.sampler.keys = self.keys
        return iter_loader(self.loader)


@register_format("imagefolder")
class ImageFolderSource:
    """Images in a folder of any layout; labels by the rule of `barlow.data.listing` (the `Source` contract).
    `cache`: where the listing is kept (read when there, written when `keep`), so a restart does not list again."""

    def __init__(self, url: str, data: DataSpec, cache: str | None = None, keep: bool = False):
        self.url, self.data = url, data
        self.s3 = storage.S3Settings(**data.s3.model_dump())
        listing = listing_of(url, self.s3, cache, keep)
        self.layout = listing.layout()
        try:
            self.classes, images = labelled_images(listing, data.labels)
        except ValueError as e:
            raise NoImages(str(e)) from None
        self.files = [(img.path, img.label) for img in images]
        self.keys = [img.key for img in images]
        self.num_samples = len(self.files)
        self._loader: PersistentLoader[tuple[_FolderBatches, _Keys, DataLoader]] = PersistentLoader()

    def describe(self) -> str:
        return describe(self.num_samples, len(self.classes), self.layout)

    def subset(self, percent: int) -> list[int]:
        """Indices of the `percent` % label subset: per class (unlabelled images: as one class) the images with the
        smallest key hashes, the rule of barlow.data.subsets, so an image folder and its shards
        select the same images."""
        if not 0 < percent <= 100:
            raise ValueError(f"subset_percent: must be in (0, 100] (got {percent})")
        if percent == 100:
            return list(range(self.num_samples))
        hashes = [key_hash(k) for k in self.keys]
        groups = [max(label, 0) for _, label in self.files]
        by_class: list[list[int]] = [[] for _ in range(max(1, len(self.classes)))]
        for h, g in zip(hashes, groups, strict=True):
            by_class[g].append(h)
        limit = subset_thresholds(by_class, percent)
        return [i for i, (h, g) in enumerate(zip(hashes, groups, strict=True)) if h <= limit[g]]

    def count(self, subset_percent: int = 100) -> int:
        return len(self.subset(subset_percent))

    def loader(self, *, transform: SampleTransform, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
               start_step: int = 0, workers: int = 0, shuffle: bool = True, drop_last: bool = True,
               subset_percent: int = 100, pin_memory: bool = False) -> FolderLoader:
        """The `HostBatch`es of one epoch on one rank; the contract: `barlow.data.source.Source.loader`. The loader
        workers are started once for a set of arguments other than `epoch` and `start_step`, and serve every epoch:
        an epoch does not pay for starting them again."""
        order = _Order(batch_size, rank, world_size, seed, shuffle, drop_last)
        def build() -> tuple[_FolderBatches, _Keys, DataLoader]:
            dataset = _FolderBatches(self.files, self.subset(subset_percent), order, transform, self.data, self.s3)
            sampler = _Keys()
            return dataset, sampler, DataLoader(
                dataset, batch_size=None, sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                prefetch_factor=2 if workers else None, pin_memory=pin_memory, worker_init_fn=loader_worker_init)
        dataset, sampler, dataloader = self._loader.get((transform, order, workers, subset_percent, pin_memory), build)
        n = len(dataset.batches(epoch, start_step))  # here too: a bad start_step is an error in this process
        return FolderLoader(dataloader, sampler, [(epoch, start_step, j) for j in range(n)])
