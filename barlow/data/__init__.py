"""Image sources: an ImageNet-style folder or tar shards, read through fsspec, served as batches.

Every source implements one contract (`barlow.data.source.Source`: listing, label subsets, seeding, retries,
corrupt images, `loader(...)` yielding `HostBatch`es), so the training loop does not know where the images live.

Formats are plug-ins: `barlow.spec.DATA_FORMATS` maps each `data.format` value to the source module that implements
it, and that module decorates its class with `@register_format("name")`. To add a format: one new source module and
its line in `DATA_FORMATS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from barlow.spec import DATA_FORMATS, DataSpec

if TYPE_CHECKING:
    from barlow.data.source import Source

_FORMATS: dict[str, Callable[[str, DataSpec], Source]] = {}


def register_format(name: str) -> Callable[[type], type]:
    """Class decorator: `cls(url, data_spec)` opens the sources of `data.format: name`."""

    def register(cls: type) -> type:
        _FORMATS[name] = cls
        return cls

    return register


def formats() -> dict[str, Callable[[str, DataSpec], Source]]:
    """Every registered format, by name."""
    for module in dict.fromkeys(DATA_FORMATS.values()):  # imported on first use: they need torch
        importlib.import_module(module)
    return dict(_FORMATS)


def open_source(data: DataSpec, split: Literal["train", "val"], cache: str | None = None, keep: bool = False) -> Source:
    """The source for the train or val images of a spec. `cache`: a URL where the source keeps what it computed of
    the data (a folder's listing, a shard set's counts), read when there, written there with `keep` (one rank)."""
    url = data.train if split == "train" else data.val
    if url is None:
        raise ValueError(f"data.{split}: no {split} images given")
    return formats()[data.format](url, data, cache=cache, keep=keep)


@dataclass(frozen=True)
class DataSummary:
    """What a set of images is, read without torch (listing or index only): `barlow plan` and the pipeline's check."""

    images: int
    classes: int
    text: str  # `640 images, unlabelled (flat folder)`


def summarize(data: DataSpec, split: Literal["train", "val"] = "train") -> DataSummary:
    """Count a spec's train or val images without training: from the kept listing or index when there is one,
    without torch for the built-in formats; another format's source counts them (which needs torch)."""
    from barlow import storage

    url = data.train if split == "train" else data.val
    if url is None:
        raise ValueError(f"data.{split}: no {split} images given")
    s3 = storage.S3Settings(**data.s3.model_dump())
    if data.format == "shards":
        from barlow.data.layout import load_index

        index = load_index(url, s3)
        return DataSummary(index.num_samples, len(index.classes),
                           f"{index.num_samples:,} images in {len(index.shards)} shards, {len(index.classes)} classes")
    if data.format in ("webdataset", "parquet"):
        from barlow.data import parquet, tarindex

        index = (tarindex if data.format == "webdataset" else parquet).index_of(url, s3)
        labels = f"{len(index.classes)} classes" if index.classes else "unlabelled"
        files = len({s.name.rsplit("#", 1)[0] for s in index.shards})
        what = "WebDataset shards" if data.format == "webdataset" else "parquet files"
        return DataSummary(index.num_samples, len(index.classes), f"{index.num_samples:,} images in {files} {what}, {labels}")
    if data.format != "imagefolder":  # a format without a torch-free count here: its source counts (needs torch)
        source = open_source(data, split)
        return DataSummary(source.num_samples, len(source.classes), source.describe())
    from barlow.data.listing import NoImages, describe, labelled_images, listing_of

    listing = listing_of(url, s3)
    try:
        classes, images = labelled_images(listing, data.labels)
    except ValueError as e:
        raise NoImages(str(e)) from None
    return DataSummary(len(images), len(classes), describe(len(images), len(classes), listing.layout()))
