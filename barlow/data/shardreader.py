"""Streaming reader of tar shards (local or s3://): deterministic epochs, equal steps per rank, exact resume.

One epoch, as a plan computed from the index alone (no I/O):
1. Shard order: the index order, or (shuffle) a permutation seeded by (seed, epoch).
2. The shards' samples in that order form one sequence of N (the `subset_percent` subset: N counts only it).
   Training (drop_last): the first S*B*W samples, S = N // (B*W), are cut into W contiguous rank ranges of
   S*B; the last N - S*B*W samples of the sequence (a different tail each epoch) are not served this epoch.
   Evaluation: N is cut into W contiguous ranges differing by at most one sample; the last batch may be short.
3. A rank's batches j = 0..nb-1 go round-robin to its loader workers (j % workers); each worker reads one
   contiguous part of the rank's range, so workers read different shards (ranges may split a shard: the
   samples before a split point are read and dropped, never decoded). The workers persist across epochs and plan
   each epoch themselves.
4. Shuffle (training): each worker emits its samples through a bounded buffer of data.shuffle_buffer samples
   (fill, then emit a random slot and refill it; drain shuffled), seeded by (seed, epoch, rank, worker).
   The order is computed on sample positions before reading, so a resume knows exactly what was served.
5. Augmentations are seeded per batch by (seed, epoch, rank, batch), not by worker state.

Resume at start_step k (the batches this rank consumed): every worker skips its batches j < k, replays its
buffer order on positions (no decode), starts reading at the first sample still to be emitted, and the
batches that follow are exactly those an uninterrupted epoch would have served next, in the same order
(given the same seed, world size and workers).

A corrupt image (on_corrupt=skip) is counted in the batch's n_corrupt and its slot is filled with another
augmentation of an image of the same batch, so batches stay full and ranks stay in step.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from barlow import storage
from barlow.data import register_format
from barlow.data.layout import Sample, ShardIndex, iter_samples, load_index
from barlow.data.parquet import INDEX_FORMAT as PARQUET_INDEX_FORMAT
from barlow.data.parquet import index_of as parquet_index_of
from barlow.data.parquet import row_group_samples
from barlow.data.source import HostBatch, PersistentLoader, SampleTransform, build_batch, derive_seed, iter_loader, loader_worker_init
from barlow.data.tarindex import INDEX_FORMAT as WDS_INDEX_FORMAT
from barlow.data.tarindex import index_of
from barlow.errors import RunFailed
from barlow.spec import DataSpec


class MissingShard(FileNotFoundError):
    """A shard the index lists is not there."""


class ShardError(RunFailed, ValueError):
    """A shard that does not match its index (truncated, rewritten, or not a shard)."""


@dataclass(frozen=True)
class Segment:
    shard: int
    start: int  # positions among the shard's (subset) samples, [start, stop)
    stop: int


@dataclass(frozen=True)
class WorkerPlan:
    segments: tuple[Segment, ...]
    batch_sizes: tuple[int, ...]  # this worker's batches in order
    batch_ids: tuple[int, ...]  # their numbers on the rank (the j of the module doc)
    skip: int  # batches already served before a resume
    order_seed: int | None  # None: stream order (no shuffle buffer)

    @property
    def num_samples(self) -> int:
        return sum(s.stop - s.start for s in self.segments)


def rank_range(n: int, batch_size: int, rank: int, world_size: int, drop_last: bool) -> tuple[int, int, list[int]]:
    """(start, stop, batch sizes) of one rank's contiguous share of an epoch's N samples."""
    if drop_last:
        steps = n // (batch_size * world_size)
        per_rank = steps * batch_size
        return rank * per_rank, (rank + 1) * per_rank, [batch_size] * steps
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    size = base + (rank < extra)
    sizes = [batch_size] * (size // batch_size) + ([size % batch_size] if size % batch_size else [])
    return start, start + size, sizes


def epoch_plan(counts: list[int], *, batch_size: int, rank: int, world_size: int, workers: int, seed: int, epoch: int,
               start_step: int = 0, shuffle: bool = True, drop_last: bool = True, shuffle_buffer: int = 0) -> list[WorkerPlan]:
    """Every loader worker's part of one rank's epoch, from per-shard sample counts; see the module doc."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, {world_size}) (got {rank})")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be positive (got {batch_size})")
    order = list(range(len(counts)))
    if shuffle:
        random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    lo, hi, sizes = rank_range(sum(counts), batch_size, rank, world_size, drop_last)
    if start_step < 0 or start_step > len(sizes):
        raise ValueError(f"start_step: must be in [0, {len(sizes)}] for this epoch (got {start_step})")
    n_workers = max(1, workers)
    plans, cursor = [], lo
    for w in range(n_workers):
        ids = tuple(range(w, len(sizes), n_workers))
        mine = tuple(sizes[j] for j in ids)
        end = cursor + sum(mine)
        plans.append(WorkerPlan(_segments(counts, order, cursor, end), mine, ids, sum(j < start_step for j in ids),
                                derive_seed("buffer", seed, epoch, rank, world_size, w, n_workers)
                                if shuffle and shuffle_buffer > 1 else None))
        cursor = end
    assert cursor == hi
    return plans


def _segments(counts: list[int], order: list[int], lo: int, hi: int) -> tuple[Segment, ...]:
    """The pieces of shards covering positions [lo, hi) of the sequence of shards in `order`."""
    out, pos = [], 0
    for shard in order:
        n = counts[shard]
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append(Segment(shard, a - pos, b - pos))
        pos += n
        if pos >= hi:
            break
    return tuple(out)


def buffer_order(n: int, buffer: int, seed: int | None) -> list[int]:
    """The order a shuffle buffer of `buffer` slots emits positions 0..n-1 in (identity without a seed)."""
    if seed is None or buffer <= 1:
        return list(range(n))
    rng = random.Random(seed)
    slots: list[int] = []
    out: list[int] = []
    for i in range(n):
        if len(slots) < buffer:
            slots.append(i)
            continue
        j = rng.randrange(buffer)
        out.append(slots[j])
        slots[j] = i
    rng.shuffle(slots)
    return out + slots


@register_format("shards")
class ShardSource:
    """Tar shards described by an index.json (see `barlow.data.layout`), served as batches by `loader()`."""

    def __init__(self, url: str, data: DataSpec, cache: str | None = None, keep: bool = False):
        self.url, self.data = url, data  # the index is the kept count: nothing to cache
        self.s3 = storage.S3Settings(**data.s3.model_dump())
        self.index: ShardIndex = self.open_index(cache, keep)
        self.classes: list[str] = self.index.classes
        self.num_samples: int = self.index.num_samples
        self._loader: PersistentLoader[tuple[_RankEpochs, DataLoader | None]] = PersistentLoader()

    def open_index(self, cache: str | None, keep: bool) -> ShardIndex:
        return load_index(self.url, self.s3)

    def describe(self) -> str:
        return f"{self.num_samples:,} images in {len(self.index.shards)} shards, {len(self.classes)} classes"

    def count(self, subset_percent: int = 100) -> int:
        """Samples in the `subset_percent` % label subset (all of them at 100)."""
        return self.index.count(subset_percent)

    def loader(self, *, transform: SampleTransform, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
               start_step: int = 0, workers: int = 0, shuffle: bool = True, drop_last: bool = True,
               subset_percent: int = 100, pin_memory: bool = False) -> ShardLoader:
        """The `HostBatch`es of one epoch on one rank (the contract: `barlow.data.source.Source`); see the module doc.

        drop_last: exactly `count(subset_percent) // (batch_size * world_size) - start_step` full batches.
        Otherwise every sample exactly once across ranks, the last batch of a rank may be short.
        The loader workers are started once for a set of arguments other than `epoch` and `start_step`, and serve
        every epoch: an epoch does not pay for starting them again.
        """
        self.index.check_percent(subset_percent)
        args = _EpochArgs(batch_size, rank, world_size, seed, max(1, workers), shuffle, drop_last, subset_percent)
        def build() -> tuple[_RankEpochs, DataLoader | None]:
            rank_epochs = _RankEpochs(self.index, self.data, self.s3, transform, args)
            return rank_epochs, DataLoader(
                rank_epochs, batch_size=None, num_workers=workers, prefetch_factor=2, persistent_workers=True,
                pin_memory=pin_memory, worker_init_fn=loader_worker_init) if workers else None
        rank_epochs, dataloader = self._loader.get((args, transform, workers, pin_memory), build)
        plans = rank_epochs.plans(epoch, start_step)  # here too: a bad start_step is an error in this process
        return ShardLoader(rank_epochs, dataloader, epoch, start_step, sum(len(p.batch_sizes) - p.skip for p in plans))


@register_format("webdataset")
class WebDatasetSource(ShardSource):
    """WebDataset tars other tools wrote (a brace pattern or a folder of .tar), counted once from their headers into
    an index kept at `cache` (`barlow.data.tarindex`), then served as `barlow data shard`'s shards are."""

    def open_index(self, cache: str | None, keep: bool) -> ShardIndex:
        return index_of(self.url, self.s3, cache, keep)

    def describe(self) -> str:
        labels = f"{len(self.classes)} classes" if self.classes else "unlabelled"
        return f"{self.num_samples:,} images in {len(self.index.shards)} WebDataset shards, {labels}"


@register_format("parquet")
class ParquetSource(ShardSource):
    """Parquet files with an image column as Hugging Face `datasets` writes them, one row group at a time; the
    index of their row groups is built once and kept (`barlow.data.parquet`)."""

    def open_index(self, cache: str | None, keep: bool) -> ShardIndex:
        return parquet_index_of(self.url, self.s3, cache, keep)

    def describe(self) -> str:
        labels = f"{len(self.classes)} classes" if self.classes else "unlabelled"
        files = len({s.name.rsplit("#", 1)[0] for s in self.index.shards})
        return f"{self.num_samples:,} images in {files} parquet files, {labels}"


@dataclass(frozen=True)
class _EpochArgs:
    """Everything that plans one rank's epochs but the epoch and the start step."""

    batch_size: int
    rank: int
    world_size: int
    seed: int
    workers: int
    shuffle: bool
    drop_last: bool
    percent: int


class ShardLoader:
    """One epoch of one rank (what `loader()` returns); len() is the number of batches it yields. One epoch of a
    source is iterated at a time."""

    def __init__(self, rank_epochs: _RankEpochs, loader: DataLoader | None, epoch: int, start_step: int,
                 batches: int):
        self.rank_epochs, self.loader = rank_epochs, loader  # loader None: no workers, read in this process
        self.epoch, self.start_step, self.batches = epoch, start_step, batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[HostBatch]:
        self.rank_epochs.set_epoch(self.epoch, self.start_step)
        return iter_loader(self.loader) if self.loader is not None else iter(self.rank_epochs)


class _RankEpochs(IterableDataset):
    """One rank's epochs, as persistent loader workers serve them: before each epoch the training process writes
    the epoch and start step into shared memory (`set_epoch`), and each worker plans its own part of it (a plan
    needs the index only)."""

    def __init__(self, index: ShardIndex, data: DataSpec, s3: storage.S3Settings, transform: SampleTransform,
                 args: _EpochArgs):
        self.index, self.data, self.s3, self.transform, self.args = index, data, s3, transform, args
        self.counts = [index.samples_in(i, args.percent) for i in range(len(index.shards))]
        self.epoch = torch.zeros(2, dtype=torch.long).share_memory_()  # epoch, start step: read by the workers

    def set_epoch(self, epoch: int, start_step: int) -> None:
        self.epoch[0], self.epoch[1] = epoch, start_step  # before the loader signals its workers to start the epoch

    def plans(self, epoch: int, start_step: int) -> list[WorkerPlan]:
        """Per worker slot in the order the DataLoader asks them (round-robin from worker 0): the first asked
        holds batch start_step."""
        a = self.args
        plans = epoch_plan(self.counts, batch_size=a.batch_size, rank=a.rank, world_size=a.world_size,
                           workers=a.workers, seed=a.seed, epoch=epoch, start_step=start_step, shuffle=a.shuffle,
                           drop_last=a.drop_last, shuffle_buffer=self.data.shuffle_buffer)
        return [plans[(slot + start_step) % len(plans)] for slot in range(len(plans))]

    def __iter__(self) -> Iterator[HostBatch]:
        epoch, start_step = self.epoch.tolist()
        info = get_worker_info()
        reader = _Reader(self.index, self.data, self.s3, self.args.percent, self.transform,
                         (self.args.seed, epoch, self.args.rank))
        return reader.run(self.plans(epoch, start_step)[info.id if info else 0])


def _checked(samples: Iterator[Sample]) -> Iterator[Sample]:
    """A shard's samples; what is wrong with the shard (not a tar, cut short, a sample without a .cls) a ShardError."""
    try:
        yield from samples
    except ValueError as e:
        raise ShardError(str(e)) from None


class _Reader:
    """Turns a WorkerPlan into batches: read shards in order, emit in buffer order, decode, augment, collate."""

    def __init__(self, index: ShardIndex, data: DataSpec, s3: storage.S3Settings, percent: int, transform: SampleTransform,
                 seed: tuple[int, int, int]):
        self.index, self.s3, self.percent, self.transform, self.seed = index, s3, percent, transform, seed
        self.on_corrupt, self.buffer = data.on_corrupt, data.shuffle_buffer

    def positions(self, plan: WorkerPlan, first: int) -> Iterator[tuple[int, Sample, str]]:
        """(position in the worker's sequence, sample, shard URL) from position `first` on."""
        pos = 0
        for seg in plan.segments:
            length = seg.stop - seg.start
            if pos + length <= first:  # wholly consumed before a resume: not even opened
                pos += length
                continue
            url = self.index.shard_url(seg.shard)
            i = 0
            for sample in self._shard_samples(url, seg.shard):
                if i >= seg.stop:
                    break
                if i >= seg.start:
                    if pos >= first:
                        yield pos, sample, url
                    pos += 1
                i += 1
            if i < seg.stop:
                raise ShardError(f"{url}: has {i} samples{self._of_subset()}, the index {self.index.url} lists "
                                 f"{self.index.samples_in(seg.shard, self.percent)} (rewrite the shards)")

    def _of_subset(self) -> str:
        return f" in the {self.percent}% subset" if self.percent != 100 else ""

    def _shard_samples(self, url: str, shard: int) -> Iterator[Sample]:
        for sample in self._stored_samples(url, shard):
            if not 0 <= sample.label < len(self.index.classes) and not (sample.label == -1 and not self.index.classes):
                raise ShardError(f"{url}: sample {sample.key} has class {sample.label}, the index has "
                                 f"{len(self.index.classes)} classes (shards and index do not belong together)")
            if self.index.in_subset(sample.key, sample.label, self.percent):
                yield sample

    def _stored_samples(self, url: str, shard: int) -> Iterator[Sample]:
        """Every sample of one shard (a tar, or a parquet row group), in stored order."""
        try:
            if self.index.format == PARQUET_INDEX_FORMAT:
                yield from row_group_samples(url, self.s3)
                return
            f = storage.open_read(url, s3=self.s3)
        except FileNotFoundError:
            raise MissingShard(f"{url}: shard {self.index.shards[shard].name} listed in {self.index.url} "
                               "is missing") from None
        with f:
            yield from _checked(iter_samples(f, url, self.index.format == WDS_INDEX_FORMAT))

    def run(self, plan: WorkerPlan) -> Iterator[HostBatch]:
        order = buffer_order(plan.num_samples, self.buffer, plan.order_seed)
        done = sum(plan.batch_sizes[:plan.skip])
        todo = order[done:]
        if not todo:
            return
        wanted = set(todo)
        stream = self.positions(plan, min(todo))
        held: dict[int, tuple[Sample, str]] = {}

        def take(p: int) -> tuple[Sample, str]:
            while p not in held:
                pos, sample, url = next(stream)
                if pos in wanted:  # a position not wanted was served before the resume
                    held[pos] = (sample, url)
            return held.pop(p)

        at = 0
        for size, batch_id in zip(plan.batch_sizes[plan.skip:], plan.batch_ids[plan.skip:], strict=True):
            samples = [take(p) for p in todo[at:at + size]]
            at += size
            yield self._batch(samples, batch_id)

    def _batch(self, samples: list[tuple[Sample, str]], batch_id: int) -> HostBatch:
        items = [(sample.image, f"{url}: {sample.key}.{sample.ext}", sample.label) for sample, url in samples]
        return build_batch(items, self.transform, self.on_corrupt, derive_seed("augment", *self.seed, batch_id))
