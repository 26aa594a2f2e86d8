"""The shard layout: WebDataset-style tar members, sample keys, the JSON index and the labelled subsets.

A shard is a plain tar of samples, each two consecutive members `<key>.<ext>` (the image bytes as stored in
the source folder: jpg, png, ...) and `<key>.cls` (the class index in ASCII). A key is `<class>/<file stem>`.
The index (`index.json`, beside the shards) lists the shards in order with their sample counts; it is written
after every shard is complete, so a shard set without its index is unfinished.

The index stores each class's hash threshold of the 10% and 1% label subsets (the rule of `subsets.py`), so a
reader decides membership from the key alone and every reader picks the same samples.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import IO

from barlow import storage
from barlow.data.listing import IMAGE_EXTENSIONS, NoImages, SourceImage, labelled_images, list_folder
from barlow.data.subsets import key_hash
from barlow.errors import RunFailed

__all__ = ["IMAGE_EXTENSIONS", "SourceImage", "list_images"]

INDEX_FORMAT = "barlow-shards/1"
TAR_FORMAT = tarfile.PAX_FORMAT  # long or non-ASCII keys get a pax header instead of failing


@dataclass
class ShardInfo:
    name: str  # file name beside the index
    samples: int
    bytes: int
    subset_samples: dict[str, int] = field(default_factory=dict)  # "10" / "1" -> samples of that subset here


@dataclass
class ShardIndex:
    """What `index.json` holds; `url` is where it was read from (not stored)."""

    classes: list[str]
    shards: list[ShardInfo]
    class_counts: list[int]
    subset_thresholds: dict[str, list[int]]
    shuffle_seed: int
    shard_size: int
    format: str = INDEX_FORMAT
    url: str = ""

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def shard_url(self, i: int) -> str:
        base = self.url.rsplit("/", 1)[0] if "/" in self.url else "."
        return storage.join(base, self.shards[i].name)

    def samples_in(self, i: int, percent: int = 100) -> int:
        return self.shards[i].samples if percent == 100 else self.shards[i].subset_samples[str(percent)]

    def count(self, percent: int = 100) -> int:
        self.check_percent(percent)
        return sum(self.samples_in(i, percent) for i in range(len(self.shards)))

    def check_percent(self, percent: int) -> None:
        if percent != 100 and str(percent) not in self.subset_thresholds:
            have = ", ".join(["100", *self.subset_thresholds])
            raise ValueError(f"subset_percent: {percent} is not in {self.url} (has {have})")

    def in_subset(self, key: str, label: int, percent: int) -> bool:
        # unlabelled samples (label -1) form one group
        return percent == 100 or key_hash(key) <= self.subset_thresholds[str(percent)][max(label, 0)]

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("url")
        d["num_samples"] = self.num_samples
        return json.dumps(d, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, url: str) -> ShardIndex:
        try:
            d = json.loads(text)
            if d.get("format") != INDEX_FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, expected {INDEX_FORMAT!r}")
            d.pop("num_samples", None)
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            index = cls(**d, url=url)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{url}: not a shard index written by `barlow data shard` ({e})") from None
        if len(index.class_counts) != len(index.classes) or not index.shards:
            raise ValueError(f"{url}: shard index lists no shards or mismatched class counts")
        return index


def load_index(url: str, s3: storage.S3Settings | None = None) -> ShardIndex:
    """Read and check a shard index; FileNotFoundError names the URL."""
    try:
        text = storage.read_bytes(url, s3).decode()
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no shard index there (write one with `barlow data shard SRC DST`)") from None
    return ShardIndex.from_json(text, url)


def split_member(name: str) -> tuple[str, str]:
    """`cls/stem.jpg` -> (`cls/stem`, `jpg`): the key ends at the first dot of the file name (WebDataset's rule)."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def tar_member(name: str, size: int) -> tarfile.TarInfo:
    """A reproducible header: no time, owner or permissions from the machine that wrote it."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
    return info


def member_bytes(name: str, size: int) -> int:
    """Bytes a member takes in a shard: its header(s) plus its data padded to 512-byte blocks."""
    header = len(tar_member(name, size).tobuf(TAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
    return header + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def tar_size(member_total: int) -> int:
    """A whole shard's size from its members' bytes: two zero blocks, then padding to a 10 KiB record."""
    n = member_total + 2 * tarfile.BLOCKSIZE
    return -(-n // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


@dataclass
class Sample:
    key: str
    label: int
    image: bytes
    ext: str


WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a WebDataset sample's image: the first of these present


class BadShards(RunFailed, ValueError):
    """Shards or parquet files that cannot be read as a data set: a pattern that matches none, a tar without images,
    a parquet file without an image column."""


def label_of(members: dict, url: str, key: str) -> int:
    """A sample's label: `.cls` (an integer), else a `label` / `cls` key of `.json`, else -1."""
    try:
        if members.get("cls") is not None:
            return int(members["cls"].decode().strip())
        if members.get("json") is not None:
            d = json.loads(members["json"])
            value = d.get("label", d.get("cls")) if isinstance(d, dict) else None
            return -1 if value is None else int(value)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise BadShards(f"{url}: sample {key} has a label that is not an integer") from None
    return -1



def iter_samples(f: IO[bytes], shard: str, webdataset: bool = False) -> Iterator[Sample]:
    """Samples of one shard read as a stream (no seeking), in stored order.

    A sample without an image or a class is an error naming the shard and key: the writer never makes one.
    `webdataset` (shards other tools wrote, `barlow.data.tarindex`): the image is the first of its extensions, the
    label `.cls` or `.json`'s label/cls, else -1; a sample without an image is skipped, as the count skipped it.
    """
    current: dict[str, bytes] = {}
    current_key: str | None = None

    def finish() -> Sample | None:
        if webdataset:
            image = next((e for e in WDS_IMAGE_EXTENSIONS if e in current), None)
            return None if image is None else Sample(current_key, label_of(current, shard, current_key),
                                                     current[image], image)
        images = [e for e in current if e in IMAGE_EXTENSIONS]
        if not images or "cls" not in current:
            raise ValueError(f"{shard}: sample {current_key} lacks {'an image' if not images else 'a .cls'} member")
        try:
            label = int(current["cls"].decode().strip())
        except ValueError:
            raise ValueError(f"{shard}: sample {current_key} has a bad .cls ({current['cls'][:20]!r})") from None
        return Sample(current_key, label, current[images[0]], images[0])

    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member(member.name)
                if key != current_key and current:
                    if (sample := finish()) is not None:
                        yield sample
                    current = {}
                current_key = key
                current[ext] = tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise ValueError(f"{shard}: not a readable tar shard ({e})") from None
    if current and (sample := finish()) is not None:
        yield sample


def list_images(src: str, s3: storage.S3Settings | None = None) -> tuple[list[str], list[SourceImage]]:
    """Classes (sorted folder names) and images of `<src>/<class>/<file>`, in a stable order (what the shard writer
    takes): the folder's listing must be the class layout (`barlow.data.listing`)."""
    listing = list_folder(src, s3)
    classes, images = labelled_images(listing, "auto")
    if not classes:
        raise NoImages(f"{src}: no images in <class>/<image> layout (a {listing.layout()}: shards need classes)")
    return classes, images
