"""The one source contract (image folder and tar shards alike), the per-sample transform it applies, the batch it
serves, and the corrupt-image refill.

Every source (`imagefolder.ImageFolderSource`, `shardreader.ShardSource`) shares, through this module and layout.py:
- the listing and accepted extensions (`layout.list_images`, `layout.IMAGE_EXTENSIONS`) and the sample key
  `<class>/<file stem>`;
- the label subsets: per class, the images whose key hash is among the `max(1, round(n * p / 100))` smallest
  (`subsets.key_hash`), so `eval.train_percent` selects the same images whatever `data.format`;
- seeding: augmentation draws come from one seed per batch, `derive_seed("augment", seed, epoch, rank, batch)`,
  never from worker state, so a mid-epoch resume serves the same draws;
- retries: every read goes through `barlow.storage` with the spec's `data.s3` settings passed explicitly;
- corrupt images: only an undecodable file (`decode.CorruptImage`) counts; its slot is refilled from another image
  of the same batch (`refill_from`, the one rule for the host decode here and the device decode in feed.py), so
  batches stay full and ranks stay in step.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import torch
from torch.utils.data import DataLoader

from barlow.data.decode import CorruptImage

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # what a preemption, a node drain or Ctrl-C sends


def iter_loader(loader: DataLoader) -> Iterator[Any]:
    """`iter(loader)` with the stop signals held while it forks loader workers: a worker forked while a stop signal
    is in flight keeps it pending until `loader_worker_init` has taken it out of the run's process group."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a signal that came meanwhile reaches the trainer now


def loader_worker_init(worker_id: int) -> None:
    """Every loader worker's `worker_init_fn`: a session of its own, so that the run's stop signal, which torchrun
    sends to each training process's whole process group (a preemption, a node drain, Ctrl-C), does not kill the
    workers mid-step; the training process stops at its agreed step, checkpoints, and then shuts them down."""
    os.setsid()
    while hasattr(signal, "sigtimedwait") and signal.sigtimedwait(STOP_SIGNALS, 0) is not None:  # (macOS has none)
        pass  # a stop signal sent to the trainer's group before this worker left it: taken, not acted on
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, the same in every process and Python version."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


@runtime_checkable
class SampleTransform(Protocol):
    """What a source applies to each sample: bytes + name -> a sample, drawing from its own RNG, which the source
    reseeds per batch; `collate` turns a batch's samples into `HostBatch.inputs`."""

    def reseed(self, seed: int) -> None: ...

    def __call__(self, data: bytes, name: str) -> Any: ...

    def collate(self, samples: list[Any]) -> Any: ...


@dataclass
class HostBatch:
    """One loader batch. `inputs` is what the transform collated: for training with `barlow.augment.HostCrops`, the two
    uint8 view crops `(x1, x2)` (decode=cpu) or an `Encoded` (decode=gpu); for an `ImageTransform`, one tensor.
    `seed` is the batch's augmentation seed: the device-side views derive their parameters from it."""

    inputs: Any
    labels: torch.Tensor
    n_corrupt: int
    seed: int

    def pin_memory(self) -> HostBatch:
        """Called by DataLoader(pin_memory=True) in its pinning thread."""
        return HostBatch(_pin(self.inputs), self.labels.pin_memory(), self.n_corrupt, self.seed)

    def __reduce__(self):  # the labels inline in the pickle: cheaper than a shared-memory block of their own
        return _host_batch, (self.inputs, self.labels.numpy(), self.n_corrupt, self.seed)


def _host_batch(inputs: Any, labels: Any, n_corrupt: int, seed: int) -> HostBatch:
    return HostBatch(inputs, torch.from_numpy(labels), n_corrupt, seed)


def _pin(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.pin_memory()
    if isinstance(x, tuple):
        return tuple(_pin(v) for v in x)
    return x.pin_memory()  # Encoded


@runtime_checkable
class Source(Protocol):
    """What the training and evaluation loops need of a set of images (one per `data.format`, see barlow.data)."""

    url: str
    classes: list[str]  # sorted class (folder) names; a label is an index into it (none: unlabelled, label -1)
    num_samples: int  # every image

    def describe(self) -> str:
        """What the data is, in one phrase: `640 images, unlabelled (flat folder)`."""
        ...

    def count(self, subset_percent: int = 100) -> int:
        """Images in the `subset_percent` % label subset (see the module doc)."""
        ...

    def loader(self, *, transform: SampleTransform, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
               start_step: int = 0, workers: int = 0, shuffle: bool = True, drop_last: bool = True,
               subset_percent: int = 100, pin_memory: bool = False) -> Iterable[HostBatch]:
        """The `HostBatch`es of one epoch on one rank, `len()` of them.

        drop_last (training): exactly `count(subset_percent) // (batch_size * world_size) - start_step` full
        batches on every rank; resuming at `start_step` serves exactly the batches an uninterrupted epoch would
        have served next, with the same augmentation draws. Otherwise (evaluation): every sample exactly once
        across ranks; the last batch of a rank may be short. At most two batches per loader worker are in flight.
        """
        ...


def refill_from(n: int, bad: Sequence[int], names: Sequence[str]) -> list[int]:
    """For each corrupt slot of a batch of n (in `bad`'s order), the readable sample that refills it: the readable
    ones in turn. CorruptImage when none is readable."""
    skip = set(bad)
    good = [i for i in range(n) if i not in skip]
    if bad and not good:
        raise CorruptImage(f"every image of a batch is corrupt ({', '.join(names[i] for i in bad[:3])}, ...)")
    return [good[k % len(good)] for k in range(len(bad))]


def build_batch(items: Sequence[tuple[bytes, str, int]], transform: SampleTransform, on_corrupt: str,
                seed: int) -> HostBatch:
    """Transform `(bytes, name, label)` items with the batch's seed; a corrupt one is counted and its slot refilled
    with a fresh draw of a readable one (`refill_from`)."""
    with torch.random.fork_rng(devices=[]):  # a transform drawing from torch's RNG leaves the caller's alone
        transform.reseed(derive_seed("host", seed))  # not `seed` itself: the device views draw from that one
        outputs, bad = [], []
        for i, (data, name, _) in enumerate(items):
            try:
                outputs.append(transform(data, name))
            except CorruptImage:
                if on_corrupt == "fail":
                    raise
                bad.append(i)
        skip = set(bad)
        labels = [label for i, (_, _, label) in enumerate(items) if i not in skip]
        for i in refill_from(len(items), bad, [name for _, name, _ in items]):
            data, name, label = items[i]
            outputs.append(transform(data, name))
            labels.append(label)
    return HostBatch(transform.collate(outputs), torch.tensor(labels, dtype=torch.long), len(bad), seed)


T = TypeVar("T")


class PersistentLoader(Generic[T]):
    """A source's loader (its DataLoader and what feeds it), built once per set of loader arguments other than the
    epoch and start step: its workers persist and serve every epoch, so an epoch does not pay for starting them."""

    def __init__(self):
        self._key: Any = None
        self._built: T | None = None

    def get(self, key: Any, build: Callable[[], T]) -> T:
        if self._built is None or self._key != key:
            self._built = None  # the previous workers stop once their loader is collected
            self._built, self._key = build(), key
        return self._built
