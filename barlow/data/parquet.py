"""Parquet with an image column as Hugging Face `datasets` writes it (`image: struct<bytes: binary, path: string>`,
an optional integer `label`), a folder or glob of .parquet, local or S3, read with pyarrow over fsspec. No torch.

Each row group is one "shard" of a `layout.ShardIndex` (named `<file>#<row group>`), so the shard reader's plan
(equal steps per rank, exact resume, the shuffle buffer) serves it unchanged and reads one row group at a time.
The index is built from the files' footers and their label column only (no image bytes), once, and kept as the
WebDataset index is (`barlow.data.tarindex.kept_index`). A sample's key is `<file stem>/<row>`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

from barlow import storage
from barlow.data.layout import Sample, ShardIndex, ShardInfo
from barlow.data.subsets import SUBSET_PERCENTS, key_hash, subset_thresholds
from barlow.data.tarindex import BadShards, kept_index

INDEX_FORMAT = "barlow-parquet/1"
LABEL_COLUMN = "label"


def parquet_files(url: str, s3: storage.S3Settings | None = None) -> tuple[str, list[str]]:
    """(folder, file names in order) of a folder or a glob of .parquet; BadShards when none."""
    fs, path = storage.filesystem(url, s3)
    if any(c in url for c in "*?["):
        folder = url.rsplit("/", 1)[0]
        found = storage.retry(fs.glob, path, what=url, s3=s3)
    else:
        folder = url.rstrip("/")
        found = [p for p in storage.retry(fs.find, path, what=url, s3=s3) if p.endswith(".parquet")] \
            if storage.retry(fs.isdir, path, what=url, s3=s3) else []
    names = sorted(posixpath.basename(p) for p in found if p.endswith(".parquet"))
    if not names:
        raise BadShards(f"data.train: {url}: no .parquet files there")
    return folder, names


def image_column(schema, url: str) -> str:
    """The image column: `image`, or the first struct column with a binary `bytes` field."""
    import pyarrow as pa

    def is_image(field) -> bool:
        t = field.type
        return pa.types.is_struct(t) and any(t.field(i).name == "bytes" for i in range(t.num_fields))

    fields = list(schema)
    chosen = next((f for f in fields if f.name == "image" and is_image(f)), None) or next(filter(is_image, fields), None)
    if chosen is None:
        raise BadShards(f"{url}: no image column (struct<bytes, path>); its columns: {', '.join(schema.names)}")
    return chosen.name


def _open(url: str, s3: storage.S3Settings | None):
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url, s3)
    return pq.ParquetFile(fs.open(path, "rb"))


def build_index(url: str, s3: storage.S3Settings | None = None) -> ShardIndex:
    """Row groups of every file (footers) and the label column: a ShardIndex of row groups."""
    folder, names = parquet_files(url, s3)
    groups_of: list[tuple[str, int, list[tuple[str, int]]]] = []
    for name in names:
        file_url = storage.join(folder, name)
        f = _open(file_url, s3)
        schema = f.schema_arrow
        image_column(schema, file_url)
        has_label = LABEL_COLUMN in schema.names
        row = 0
        stem = name.removesuffix(".parquet")
        for rg in range(f.num_row_groups):
            n = f.metadata.row_group(rg).num_rows
            labels = f.read_row_group(rg, columns=[LABEL_COLUMN]).column(0).to_pylist() if has_label else [-1] * n
            groups_of.append((name, rg, [(f"{stem}/{row + i}", -1 if v is None else int(v)) for i, v in enumerate(labels)]))
            row += n
    labels = [label for *_, rows in groups_of for _, label in rows]
    if not labels:
        raise BadShards(f"data.train: {url}: no rows")
    classes = [str(c) for c in range(max(labels) + 1)] if min(labels) >= 0 else []
    groups: list[list[int]] = [[] for _ in range(max(1, len(classes)))]
    for *_, rows in groups_of:
        for key, label in rows:
            groups[max(label, 0)].append(key_hash(key))
    thresholds = {str(p): subset_thresholds(groups, p) for p in SUBSET_PERCENTS}
    infos = [ShardInfo(f"{name}#{rg}", len(rows), 0,
                       {p: sum(key_hash(k) <= t[max(lab, 0)] for k, lab in rows) for p, t in thresholds.items()})
             for name, rg, rows in groups_of]
    return ShardIndex(classes=classes, shards=infos, class_counts=[len(g) for g in groups][:len(classes)],
                      subset_thresholds=thresholds, shuffle_seed=0, shard_size=0, format=INDEX_FORMAT,
                      url=storage.join(folder, "barlow-index.json"))


def index_of(url: str, s3: storage.S3Settings | None = None, cache: str | None = None, keep: bool = False) -> ShardIndex:
    folder = url.rsplit("/", 1)[0] if any(c in url for c in "*?[") else url.rstrip("/")
    return kept_index(url, folder, INDEX_FORMAT, lambda: build_index(url, s3), s3, cache, keep)


def row_group_samples(shard_url: str, s3: storage.S3Settings | None) -> Iterator[Sample]:
    """The samples of one row group (`<file url>#<row group>`), in stored order; one row group read."""
    file_url, _, rg = shard_url.rpartition("#")
    f = _open(file_url, s3)
    column = image_column(f.schema_arrow, file_url)
    has_label = LABEL_COLUMN in f.schema_arrow.names
    table = f.read_row_group(int(rg), columns=[column, LABEL_COLUMN] if has_label else [column])
    first = sum(f.metadata.row_group(i).num_rows for i in range(int(rg)))
    stem = posixpath.basename(file_url).removesuffix(".parquet")
    labels = table.column(LABEL_COLUMN).to_pylist() if has_label else [-1] * table.num_rows
    for i, (image, label) in enumerate(zip(table.column(column).to_pylist(), labels, strict=True)):
        path = (image or {}).get("path") or ""
        ext = path.rsplit(".", 1)[-1].lower() if "." in path else "jpg"
        yield Sample(f"{stem}/{first + i}", -1 if label is None else int(label), (image or {}).get("bytes") or b"", ext)
