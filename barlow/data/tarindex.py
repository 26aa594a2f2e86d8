"""WebDataset tar shards as other tools write them (img2dataset, webdataset's ShardWriter, timm): the shard set a
`data.train` names (a brace pattern or a folder of .tar), its samples counted from the tar headers alone, and the
index kept so a restart does not count again. No torch here: `barlow plan` reads it too.

A sample is the members sharing a key (the name up to the first dot of its file name); its image is the first of
jpg, jpeg, png, webp; its label the integer in `.cls`, or the `label` / `cls` key of `.json`, else none (-1). A
sample without an image is not a sample. Counting reads each member's 512-byte header with a ranged read, and the
data of `.cls` / `.json` members only: no image bytes. The result is a `layout.ShardIndex` (labels 0..K-1 are the
classes; every label subset is computed as for `barlow data shard`), kept as JSON beside the shards by
`barlow data index URL --format webdataset` (`barlow-index.json`) or by rank 0 of a run in its output folder.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict

from barlow import storage
from barlow.data.layout import WDS_IMAGE_EXTENSIONS, BadShards, ShardIndex, ShardInfo, label_of, split_member
from barlow.data.subsets import SUBSET_PERCENTS, key_hash, subset_thresholds

__all__ = ["BadShards", "WDS_IMAGE_EXTENSIONS", "build_index", "index_of", "label_of"]

INDEX_FORMAT = "barlow-webdataset/1"
INDEX_NAME = "barlow-index.json"
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def expand_braces(pattern: str) -> list[str]:
    """`shard-{000..002}.tar` -> three names (zero padding kept); `{a,b}` lists too; several groups multiply."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = _RANGE.fullmatch(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        items = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def shard_urls(url: str, s3: storage.S3Settings | None = None) -> tuple[str, list[str]]:
    """(the shards' folder, their names in order) of a brace pattern or a folder of .tar; BadShards when none."""
    if "{" in url:
        folder, pattern = url.rsplit("/", 1) if "/" in url else (".", url)
        if "{" in folder:
            raise BadShards(f"data.train: {url}: braces may only be in the file name")
        wanted = expand_braces(pattern)
        have = set(storage.list_names(folder, s3))
        names = [n for n in wanted if n in have]
        if not names:
            raise BadShards(f"data.train: {url} matches none of the {len(have)} files in {folder}")
        missing = [n for n in wanted if n not in have]
        if missing:
            raise BadShards(f"data.train: {url}: {len(missing)} of {len(wanted)} shards are missing ({missing[0]}, ...)")
        return folder, names
    if url.endswith(".tar"):
        folder, name = url.rsplit("/", 1)
        if not storage.exists(url, s3):
            raise FileNotFoundError(f"data.train: {url}: no such shard")
        return folder, [name]
    names = [n for n in storage.list_names(url, s3) if n.endswith(".tar")]
    if not names:
        raise BadShards(f"data.train: {url}: no .tar shards there")
    return url.rstrip("/"), sorted(names)


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header (`<len> path=<name>\\n` records)."""
    for record in data.decode("utf-8", "surrogateescape").split("\n"):
        _, _, kv = record.partition(" ")
        key, _, value = kv.partition("=")
        if key == "path":
            return value
    return None


def scan_shard(url: str, s3: storage.S3Settings | None = None) -> list[tuple[str, int]]:
    """(key, label) of each sample of one tar, in stored order, from its headers (and .cls/.json data) alone."""
    total = storage.size(url, s3)
    pos, long_name = 0, None
    samples: dict[str, dict[str, bytes | None]] = {}
    found = Counter()
    while pos + tarfile.BLOCKSIZE <= total:
        block = storage.read_range(url, pos, pos + tarfile.BLOCKSIZE, s3)
        if block.count(0) == len(block):
            break  # the end-of-archive zero blocks
        try:
            info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        except tarfile.TarError as e:
            raise BadShards(f"{url}: not a readable tar at byte {pos} ({e})") from None
        start = pos + tarfile.BLOCKSIZE
        pos = start + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME):  # the next member's long name
            data = storage.read_range(url, start, start + info.size, s3)
            long_name = _pax_path(data) if info.type == tarfile.XHDTYPE else data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if info.type == tarfile.XGLTYPE or not info.isfile():
            long_name = None
            continue
        name, long_name = long_name or info.name, None
        key, ext = split_member(name)
        found[ext] += 1
        wanted = ext in ("cls", "json")
        samples.setdefault(key, {})[ext] = storage.read_range(url, start, start + info.size, s3) if wanted else None
    out = []
    for key, members in samples.items():
        if any(e in members for e in WDS_IMAGE_EXTENSIONS):
            out.append((key, label_of(members, url, key)))
    if not out:
        held = ", ".join(f"{n} .{e}" for e, n in found.most_common(4)) or "no members"
        raise BadShards(f"{url}: a tar without images ({'/'.join(WDS_IMAGE_EXTENSIONS)}); it holds {held}")
    return out


def build_index(url: str, s3: storage.S3Settings | None = None) -> ShardIndex:
    """Count every shard of `url` once (headers only) into a ShardIndex whose shard names are relative to the folder."""
    folder, names = shard_urls(url, s3)
    per_shard = [scan_shard(storage.join(folder, n), s3) for n in names]
    labels = [label for shard in per_shard for _, label in shard]
    labelled = all(label >= 0 for label in labels)
    if not labelled and any(label >= 0 for label in labels):
        raise BadShards(f"data.train: {url}: some samples have labels and some do not")
    classes = [str(c) for c in range(max(labels) + 1)] if labelled else []
    groups: list[list[int]] = [[] for _ in range(max(1, len(classes)))]
    for shard in per_shard:
        for key, label in shard:
            groups[max(label, 0)].append(key_hash(key))
    thresholds = {str(p): subset_thresholds(groups, p) for p in SUBSET_PERCENTS}
    infos = []
    for name, shard in zip(names, per_shard, strict=True):
        subset = {p: sum(key_hash(k) <= t[max(label, 0)] for k, label in shard) for p, t in thresholds.items()}
        infos.append(ShardInfo(name, len(shard), 0, subset))
    return ShardIndex(classes=classes, shards=infos, class_counts=[len(g) for g in groups][:len(classes)],
                      subset_thresholds=thresholds, shuffle_seed=0, shard_size=0, format=INDEX_FORMAT,
                      url=storage.join(folder, INDEX_NAME))


def to_json(index: ShardIndex, url: str, fmt: str = INDEX_FORMAT) -> str:
    return json.dumps({"format": fmt, "url": url, "index": {**asdict(index), "url": ""}}) + "\n"


def from_json(text: str, url: str, fmt: str = INDEX_FORMAT) -> ShardIndex | None:
    """The kept index, or None when it is not one or counts another URL."""
    try:
        d = json.loads(text)
        if d.get("format") != fmt or d.get("url") != url:
            return None
        i = d["index"]
        i["shards"] = [ShardInfo(**s) for s in i["shards"]]
        return ShardIndex(**i)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def kept_index(url: str, folder: str, fmt: str, build: Callable[[], ShardIndex], s3: storage.S3Settings | None,
               cache: str | None, keep: bool) -> ShardIndex:
    """An index of `url` (format `fmt`): kept beside the data (`folder`/barlow-index.json) or at `cache`, else
    `build()` now (and written to `cache` with `keep`). Its `url` is in `folder`: shard names are relative to it."""
    for where in (storage.join(folder, INDEX_NAME), cache):
        if where is None:
            continue
        try:
            index = from_json(storage.read_text(where, s3), url, fmt)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if index is not None:
            index.url = storage.join(folder, INDEX_NAME)
            return index
    index = build()
    if keep and cache is not None:
        storage.write_text(cache, to_json(index, url, fmt), s3)
    return index


def index_of(url: str, s3: storage.S3Settings | None = None, cache: str | None = None,
             keep: bool = False) -> ShardIndex:
    """The WebDataset shard set's index (kept, or counted now)."""
    return kept_index(url, index_folder(url), INDEX_FORMAT, lambda: build_index(url, s3), s3, cache, keep)


def index_folder(url: str) -> str:
    """Where `barlow data index` keeps a shard set's index: beside its shards."""
    return url.rsplit("/", 1)[0] if ("{" in url or url.endswith(".tar")) else url.rstrip("/")

