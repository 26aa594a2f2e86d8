"""The one source contract (image folder and tar shards alike) and the batch it serves.

Both sources (`imagefolder.ImageFolderSource`, `stream.ShardSource`) share, through this module and layout.py:
- the listing and accepted extensions (`layout.list_images`, `layout.IMAGE_EXTENSIONS`) and the sample key
  `<class>/<file stem>`;
- the label subsets: per class, the images whose key hash is among the `max(1, round(n * p / 100))` smallest
  (`layout.key_hash`), so `eval.train_percent` selects the same images whatever `data.format`;
- seeding: augmentation draws come from one seed per batch, `derive_seed("augment", seed, epoch, rank, batch)`,
  never from worker state, so a mid-epoch resume serves the same draws;
- retries: every read goes through `barlow.storage` with the spec's `data.s3` settings passed explicitly;
- corrupt images: only an undecodable file (`decode.CorruptImage`) counts; its slot is refilled with another view
  of an image of the same batch (`build_batch`), so batches stay full and ranks stay in step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import default_collate

from barlow.data.decode import CorruptImage


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, the same in every process and Python version."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


@dataclass
class Batch:
    """One loader batch. `inputs` is what the transform made of each image, collated: for training with
    `cropfirst.HostCrops`, the two uint8 view crops `(x1, x2)` (decode=cpu) or an `Encoded` (decode=gpu).
    `seed` is the batch's augmentation seed: the device-side views derive their parameters from it.
    Unpacks as `(inputs, labels, n_corrupt)`.
    """

    inputs: Any
    labels: torch.Tensor
    n_corrupt: int
    seed: int

    def __iter__(self) -> Iterator[Any]:
        return iter((self.inputs, self.labels, self.n_corrupt))

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) in its pinning thread."""
        return Batch(_pin(self.inputs), self.labels.pin_memory(), self.n_corrupt, self.seed)


def _pin(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.pin_memory()
    if isinstance(x, (tuple, list)):
        return type(x)(_pin(v) for v in x)
    return x.pin_memory() if hasattr(x, "pin_memory") else x


@runtime_checkable
class Source(Protocol):
    """What the training and evaluation loops need of a set of images."""

    url: str
    classes: list[str]  # sorted class (folder) names; a label is an index into it
    num_samples: int  # every image

    def count(self, subset_percent: int = 100) -> int:
        """Images in the `subset_percent` % label subset (see the module doc)."""
        ...

    def loader(self, *, transform: Callable, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
               start_step: int = 0, workers: int = 0, shuffle: bool = True, drop_last: bool = True,
               subset_percent: int = 100, pin_memory: bool = False) -> Iterable[Batch]:
        """The `Batch`es of one epoch on one rank, `len()` of them.

        drop_last (training): exactly `count(subset_percent) // (batch_size * world_size) - start_step` full
        batches on every rank; resuming at `start_step` serves exactly the batches an uninterrupted epoch would
        have served next, with the same augmentation draws. Otherwise (evaluation): every sample exactly once
        across ranks; the last batch of a rank may be short. `transform` is either a bytes-level transform
        (`cropfirst.HostCrops`) or an image transform, applied crop-first where it allows (`cropfirst.decoder`).
        At most two batches per loader worker are in flight.
        """
        ...


def build_batch(items: Sequence[tuple[bytes, str, int]], decode: Callable[[bytes, str], Any], on_corrupt: str,
                seed: int) -> Batch:
    """Decode `(bytes, name, label)` items with the batch's seed; corrupt ones are counted and refilled."""
    with torch.random.fork_rng(devices=[]):  # augmentation seeded per batch; the caller's RNG is left alone
        torch.manual_seed(derive_seed("host", seed))  # not `seed` itself: the device views draw from that one
        if hasattr(decode, "reseed"):  # HostCrops draws from its own (cheaper) Python RNG
            decode.reseed(derive_seed("host", seed))
        outputs, labels, good, bad = [], [], [], []
        for data, name, label in items:
            try:
                outputs.append(decode(data, name))
            except CorruptImage:
                if on_corrupt == "fail":
                    raise
                bad.append(name)
                continue
            labels.append(label)
            good.append((data, name, label))
        if bad and not good:
            raise CorruptImage(f"every image of a batch is corrupt ({', '.join(bad[:3])}, ...)")
        for i in range(len(bad)):  # refill with fresh views of this batch's readable images
            data, name, label = good[i % len(good)]
            outputs.append(decode(data, name))
            labels.append(label)
    inputs = getattr(decode, "collate", default_collate)(outputs)
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    return Batch(inputs, torch.tensor(labels, dtype=torch.long), len(bad), seed)
