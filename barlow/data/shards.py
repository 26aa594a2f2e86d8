"""`barlow data shard`: an ImageNet-style folder at any fsspec URL -> tar shards + `index.json` at another.

The plan (which image goes into which shard) depends only on the source listing, the seed and the shard
size, so a rerun makes the same shards: one already there with its planned size is skipped. Shards appear
under their final name only when complete (local: rename; S3: the upload completes on close), and the index
is written last, after every shard it lists. Images keep their stored bytes; the order is shuffled (seeded)
before sharding so that every shard mixes all classes and a bounded shuffle buffer sees them all.
See `layout.py` for the format. The reader is `barlow.data.shardreader.ShardSource`.
"""

from __future__ import annotations

import io
import posixpath
import random
import re
import tarfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from barlow import storage
from barlow.data.layout import TAR_FORMAT, ShardIndex, ShardInfo, SourceImage, list_images, member_bytes, tar_member, tar_size
from barlow.data.subsets import SUBSET_PERCENTS, key_hash, subset_thresholds

DEFAULT_SHARD_SIZE = 256 << 20
INDEX_NAME = "index.json"
SHARD_NAME = "shard-{:06d}.tar"
_SHARD_RE = re.compile(r"shard-\d{6}\.tar$")


@dataclass
class PlannedShard:
    name: str
    images: list[SourceImage]
    bytes: int


def plan_shards(images: list[SourceImage], shard_size: int, seed: int) -> list[PlannedShard]:
    """Seeded shuffle, then consecutive images into shards of at most `shard_size` bytes (at least one image each)."""
    order = list(images)
    random.Random(seed).shuffle(order)
    shards: list[PlannedShard] = []
    current: list[SourceImage] = []
    used = 0
    for img in order:
        cost = member_bytes(f"{img.key}.{img.ext}", img.size) + member_bytes(f"{img.key}.cls", len(str(img.label)))
        if current and tar_size(used + cost) > shard_size:
            shards.append(PlannedShard(SHARD_NAME.format(len(shards)), current, tar_size(used)))
            current, used = [], 0
        current.append(img)
        used += cost
    if current:
        shards.append(PlannedShard(SHARD_NAME.format(len(shards)), current, tar_size(used)))
    return shards


def make_index(classes: list[str], images: list[SourceImage], shards: list[PlannedShard], shard_size: int,
               seed: int) -> ShardIndex:
    hashes: list[list[int]] = [[] for _ in classes]
    for img in images:
        hashes[img.label].append(key_hash(img.key))
    thresholds = {str(p): subset_thresholds(hashes, p) for p in SUBSET_PERCENTS}
    infos = []
    for s in shards:
        subset = {p: sum(key_hash(i.key) <= t[i.label] for i in s.images) for p, t in thresholds.items()}
        infos.append(ShardInfo(s.name, len(s.images), s.bytes, subset))
    counts = [len(h) for h in hashes]
    return ShardIndex(classes=classes, shards=infos, class_counts=counts, subset_thresholds=thresholds,
                      shuffle_seed=seed, shard_size=shard_size)


def write_shard(src: str, dst: str, shard: PlannedShard, on_image: Callable[[], None] = lambda: None) -> None:
    """Write one shard; it appears under its name only once complete. Retried whole on transient errors."""
    fs, _ = storage.filesystem(src)
    url = storage.join(dst, shard.name)

    def write() -> None:
        with storage.open_atomic(url) as f:
            with tarfile.open(fileobj=f, mode="w|", format=TAR_FORMAT) as tar:
                for img in shard.images:
                    data = storage.retry(fs.cat_file, img.path, what=img.path)
                    if len(data) != img.size:
                        raise RuntimeError(f"{img.path}: changed while sharding ({img.size} -> {len(data)} bytes); rerun")
                    _add(tar, f"{img.key}.{img.ext}", data)
                    _add(tar, f"{img.key}.cls", str(img.label).encode())
                    on_image()
            written = f.tell()
        if written != shard.bytes:  # the plan's size is how a rerun recognises a complete shard
            raise RuntimeError(f"{url}: wrote {written} bytes, planned {shard.bytes} (a bug in the size plan)")
    storage.retry(write, what=url)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(tar_member(name, len(data)), io.BytesIO(data))


def existing_sizes(dst: str) -> dict[str, int]:
    """Shard name -> size of the shards already at `dst` (one listing, not one request per shard)."""
    fs, root = storage.filesystem(dst)

    def ls() -> list[dict]:
        try:
            return fs.ls(root, detail=True, refresh=True) if fs.exists(root) else []
        except FileNotFoundError:
            return []
    entries = storage.retry(ls, what=dst)
    return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries if e.get("type") == "file"}


def write_shards(src: str, dst: str, *, shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 4, seed: int = 0,
                 progress: bool = True) -> dict:
    """Convert `src` (ImageNet layout) to shards + index at `dst`; returns counts of what was written and skipped."""
    if shard_size < 10240:
        raise ValueError(f"shard_size: must be at least 10240 bytes (got {shard_size})")
    if workers < 1:
        raise ValueError(f"workers: must be at least 1 (got {workers})")
    classes, images = list_images(src)
    plan = plan_shards(images, shard_size, seed)
    index = make_index(classes, images, plan, shard_size, seed)
    index_url = storage.join(dst, INDEX_NAME)
    have = existing_sizes(dst)
    todo = [s for s in plan if have.get(s.name) != s.bytes]
    if INDEX_NAME in have:
        if not todo and storage.read_text(index_url) == index.to_json():
            return _summary(index_url, index, written=0, skipped=len(plan))
        storage.remove(index_url)  # an index from another plan must not list shards being rewritten
    for name in have:  # shards of an earlier, larger plan and temporaries of a crashed local run
        if (_SHARD_RE.match(name) and name not in {s.name for s in plan}) or ".tar.tmp-" in name:
            storage.remove(storage.join(dst, name))

    with _Progress(progress, sum(len(s.images) for s in todo), len(plan) - len(todo), len(plan)) as bar:
        with ThreadPoolExecutor(workers, thread_name_prefix="shard") as pool:
            futures = [pool.submit(write_shard, src, dst, s, bar.image) for s in todo]
            for fut in as_completed(futures):
                fut.result()  # the first failure stops the run; finished shards stay for the rerun
                bar.shard()
    storage.write_text(index_url, index.to_json())  # last: the index is the shard set's commit marker
    return _summary(index_url, index, written=len(todo), skipped=len(plan) - len(todo))


def _summary(index_url: str, index: ShardIndex, written: int, skipped: int) -> dict:
    return {"index": index_url, "shards": len(index.shards), "written": written, "skipped": skipped,
            "samples": index.num_samples, "classes": len(index.classes), "bytes": sum(s.bytes for s in index.shards)}


class _Progress:
    """A rich progress bar over images and shards (silent when disabled); callable from writer threads."""

    def __init__(self, enabled: bool, images: int, done_shards: int, shards: int):
        self.enabled, self.images, self.done, self.total = enabled, images, done_shards, shards
        self._lock = threading.Lock()

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("images"), TimeRemainingColumn(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self._label(), total=self.images)
        return self

    def _label(self) -> str:
        return f"shards {self.done}/{self.total}"

    def image(self) -> None:
        if self.enabled:
            self._bar.advance(self._task)

    def shard(self) -> None:
        with self._lock:
            self.done += 1
            if self.enabled:
                self._bar.update(self._task, description=self._label())

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.stop()
