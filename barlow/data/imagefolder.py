"""An ImageNet-style folder (`<root>/<class>/<image>`) at any fsspec URL, served as deterministic batches.

The contract (listing, keys, label subsets, per-batch seeds, retries, corrupt images) is the one of
`barlow.data.source`; what is particular here is the order: a permutation of the files seeded by (seed, epoch),
cut into global batches, each rank taking its slice of every global batch.

Loader workers read each file through `barlow.storage` (its own S3 client per process, every read retried on
throttling and network errors with the spec's `data.s3` settings); only an undecodable file counts as corrupt.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import DataLoader, Dataset

from barlow import storage
from barlow.data import register_format
from barlow.data.layout import key_hash, list_images, subset_thresholds
from barlow.data.source import HostBatch, SampleTransform, build_batch, derive_seed
from barlow.spec import DataSpec

_READ_THREADS = 8  # parallel reads per worker on object stores, where each read is a round trip


class _FolderBatches(Dataset):
    """Batch j of one rank's epoch: read its files, then decode and transform them with the batch's seed."""

    def __init__(self, files: list[tuple[str, int]], batches: list[list[int]], first_batch: int, transform: SampleTransform,
                 data: DataSpec, s3: storage.S3Settings, seed: tuple[int, int, int]):
        self.files, self.batches, self.first_batch, self.transform = files, batches, first_batch, transform
        self.on_corrupt, self.s3, self.seed = data.on_corrupt, s3, seed
        self._pool: ThreadPoolExecutor | None = None  # made in the process that reads (threads do not survive fork)

    def __len__(self) -> int:
        return len(self.batches)

    def _read(self, url: str) -> bytes:
        return storage.read_bytes(url, self.s3)  # transient errors are retried there; they are never "corrupt"

    def __getitem__(self, j: int) -> HostBatch:
        urls = [self.files[i][0] for i in self.batches[j]]
        if not urls or storage.is_local(urls[0]):
            blobs = [self._read(u) for u in urls]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="read")
            blobs = list(self._pool.map(self._read, urls))
        items = [(b, u, self.files[i][1]) for b, u, i in zip(blobs, urls, self.batches[j], strict=True)]
        return build_batch(items, self.transform, self.on_corrupt,
                           derive_seed("augment", *self.seed, self.first_batch + j))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}


@register_format("imagefolder")
class ImageFolderSource:
    """Images in `<root>/<class>/<file>`; classes are the sorted folder names (the `Source` contract)."""

    def __init__(self, url: str, data: DataSpec):
        self.url, self.data = url, data
        self.s3 = storage.S3Settings(**data.s3.model_dump())
        try:
            self.classes, images = list_images(url, self.s3)
        except FileNotFoundError:
            if not storage.exists(url, self.s3):
                raise FileNotFoundError(f"{url}: no such image folder") from None
            raise
        scheme = url[: url.index("://") + 3] if not storage.is_local(url) else ""
        self.files = [(scheme + img.path, img.label) for img in images]
        self.keys = [img.key for img in images]
        self.num_samples = len(self.files)

    def subset(self, percent: int) -> list[int]:
        """Indices of the `percent` % label subset: per class the images with the smallest key hashes, the rule of
        the shard index (barlow.data.layout), so an image folder and its shards select the same images."""
        if not 0 < percent <= 100:
            raise ValueError(f"subset_percent: must be in (0, 100] (got {percent})")
        if percent == 100:
            return list(range(self.num_samples))
        hashes = [key_hash(k) for k in self.keys]
        by_class: list[list[int]] = [[] for _ in self.classes]
        for h, (_, label) in zip(hashes, self.files, strict=True):
            by_class[label].append(h)
        limit = subset_thresholds(by_class, percent)
        return [i for i, (h, (_, label)) in enumerate(zip(hashes, self.files, strict=True)) if h <= limit[label]]

    def count(self, subset_percent: int = 100) -> int:
        return len(self.subset(subset_percent))

    def loader(self, *, transform: SampleTransform, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
               start_step: int = 0, workers: int = 0, shuffle: bool = True, drop_last: bool = True,
               subset_percent: int = 100, pin_memory: bool = False) -> DataLoader:
        """The `HostBatch`es of one epoch on one rank; the contract: `barlow.data.source.Source.loader`."""
        indices = torch.tensor(self.subset(subset_percent), dtype=torch.long)
        if shuffle:
            g = torch.Generator().manual_seed(seed * 7919 + epoch)
            indices = indices[torch.randperm(len(indices), generator=g)]
        if drop_last:
            global_batch = batch_size * world_size
            steps = len(indices) // global_batch
            if not 0 <= start_step <= steps:
                raise ValueError(f"start_step: must be in [0, {steps}] for this epoch (got {start_step})")
            steps_view = indices[: steps * global_batch].view(steps, world_size, batch_size)
            batches = steps_view[start_step:, rank].tolist()
        else:
            mine = indices[rank::world_size].tolist()
            batches = [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]
        dataset = _FolderBatches(self.files, batches, start_step, transform, self.data, self.s3, (seed, epoch, rank))
        return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                          prefetch_factor=2 if workers else None, pin_memory=pin_memory)
