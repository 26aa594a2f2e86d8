"""Image sources: an ImageNet-style folder or tar shards, read through fsspec, served as batches.

Every source implements one contract (`barlow.data.source.Source`: listing, label subsets, seeding, retries,
corrupt images, `loader(...)` yielding `Batch`es), so the training loop does not know where the images live.
"""

from __future__ import annotations

from typing import Literal

from barlow.spec import DataSpec


def open_source(data: DataSpec, split: Literal["train", "val"]):
    """The source for the train or val images of a spec."""
    url = data.train if split == "train" else data.val
    if url is None:
        raise ValueError(f"data.{split}: no {split} images given")
    if data.format == "shards":
        from barlow.data.shards import ShardSource

        return ShardSource(url, data)
    from barlow.data.imagefolder import ImageFolderSource

    return ImageFolderSource(url, data)
