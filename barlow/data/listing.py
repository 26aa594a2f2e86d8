"""The listing of an image folder of any layout (local or S3), its labels rule, and the listing kept so a restart does
not list again. No torch here: `barlow plan` and the CLI image read it too.

Labels (`data.labels`): `auto` takes labels from the folders only in the class layout: every image exactly one
folder below the root, in at least two such folders (`<root>/<class>/<image>`, ImageNet's). Any other layout (a flat
folder, folders nested by date or camera) is unlabelled. `folders` labels every image by its top folder under the
root; `none` leaves every image unlabelled. An unlabelled image has label -1 and the source has no classes.

A listing is one recursive, paginated listing of the prefix (s3fs's `find`: ListObjectsV2 pages of 1,000 keys). It
is kept as JSON: written ahead beside the images by `barlow data index URL` (`barlow-index.json`, read first), or by
rank 0 of a run into its output folder (`data/index-train.json`), so a restart, and the other ranks, read it
instead of listing again. A kept listing is trusted: after adding images, run `barlow data index` again.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from dataclasses import dataclass

from barlow import storage
from barlow.errors import RunFailed

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "gif", "tif", "tiff")
LISTING_FORMAT = "barlow-listing/1"
INDEX_NAME = "barlow-index.json"  # what `barlow data index URL` writes beside the images
LABEL_MODES = ("auto", "folders", "none")


class NoImages(RunFailed, ValueError):
    """A folder without any image (named, with what it holds instead); a ValueError too, for the data tools."""


@dataclass
class SourceImage:
    path: str  # inside the source filesystem
    size: int
    label: int  # -1: unlabelled
    key: str  # the relative path without its extension (the stem keeps no dot): `<class>/<stem>` in class layout
    ext: str


@dataclass
class Listing:
    """The images of a folder (relative path, size), in sorted order, and what was there instead."""

    url: str
    files: list[tuple[str, int]]
    others: dict[str, int]  # extension -> files that are not images (for the error message)

    def to_json(self) -> str:
        return json.dumps({"format": LISTING_FORMAT, "url": self.url, "files": self.files, "others": self.others},
                          separators=(",", ":")) + "\n"

    @classmethod
    def from_json(cls, text: str, url: str) -> Listing | None:
        """The kept listing, or None when it is not one or lists another folder."""
        try:
            d = json.loads(text)
        except ValueError:
            return None
        if not isinstance(d, dict) or d.get("format") != LISTING_FORMAT or d.get("url", "").rstrip("/") != url.rstrip("/"):
            return None
        return cls(url, [(str(p), int(s)) for p, s in d["files"]], dict(d.get("others", {})))

    def layout(self) -> str:
        """`class folders`, `flat folder` or `nested folders`: the shape `data.labels: auto` reads."""
        depths = {p.count("/") for p, _ in self.files}
        if depths == {1} and len({p.split("/", 1)[0] for p, _ in self.files}) >= 2:
            return "class folders"
        return "flat folder" if depths == {0} else "nested folders"


def list_folder(url: str, s3: storage.S3Settings | None = None) -> Listing:
    """One recursive listing of `url` (paginated on S3); raises NoImages naming the folder and what it holds."""
    fs, root = storage.filesystem(url, s3)
    root = root.rstrip("/")
    try:
        found = storage.retry(fs.find, root, detail=True, what=url, s3=s3)
    except FileNotFoundError:
        found = {}
    files, others = [], Counter()
    for path, info in found.items():
        rel = posixpath.relpath(path, root or "/")
        base = posixpath.basename(rel)
        ext = base.rsplit(".", 1)[-1].lower() if "." in base else ""
        if ext in IMAGE_EXTENSIONS and not base.startswith("."):
            files.append((rel, int(info.get("size") or 0)))
        elif base != INDEX_NAME:
            others[f".{ext}" if ext else "without extension"] += 1
    if not files:
        if not found and not storage.exists(url, s3):
            raise FileNotFoundError(f"{url}: no such image folder")
        held = ", ".join(f"{n} {e}" for e, n in others.most_common(5)) if others else "nothing"
        raise NoImages(f"{url}: no images ({'/'.join(IMAGE_EXTENSIONS)}) at any depth; found {held}")
    return Listing(url, sorted(files), dict(others))


def kept_listing(url: str, s3: storage.S3Settings | None, cache: str | None) -> Listing | None:
    """The listing kept beside the images (`barlow data index`) or at `cache`, else None."""
    for where in (storage.join(url, INDEX_NAME), cache):
        if where is None:
            continue
        try:
            listing = Listing.from_json(storage.read_text(where, s3), url)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if listing is not None:
            return listing
    return None


def listing_of(url: str, s3: storage.S3Settings | None = None, cache: str | None = None,
               keep: bool = False) -> Listing:
    """The folder's listing: a kept one, else listed now (and, with `keep`, written to `cache`)."""
    listing = kept_listing(url, s3, cache)
    if listing is None:
        listing = list_folder(url, s3)
        if keep and cache is not None:
            storage.write_text(cache, listing.to_json(), s3)
    return listing


def labelled_images(listing: Listing, labels: str = "auto") -> tuple[list[str], list[SourceImage]]:
    """Classes (sorted folder names; none when unlabelled) and images with their labels and keys, by the rule of the
    module doc. Raises ValueError naming the folder when two images would share a key, or `folders` meets an image
    outside any folder."""
    if labels not in LABEL_MODES:
        raise ValueError(f"data.labels: must be one of {', '.join(LABEL_MODES)} (got {labels!r})")
    by_folder = labels == "folders" or (labels == "auto" and listing.layout() == "class folders")
    classes: list[str] = []
    if by_folder:
        loose = next((p for p, _ in listing.files if "/" not in p), None)
        if loose is not None:
            raise ValueError(f"data.labels: folders needs every image in a class folder; {listing.url}/{loose} is not")
        classes = sorted({p.split("/", 1)[0] for p, _ in listing.files})
    label_of = {c: i for i, c in enumerate(classes)}
    root = listing.url.rstrip("/")
    images, seen = [], {}
    for rel, size in listing.files:
        folder, base = posixpath.split(rel)
        stem, ext = base.rsplit(".", 1)
        key = posixpath.join(folder, stem.replace(".", "_")) if folder else stem.replace(".", "_")
        if key in seen:
            raise ValueError(f"{listing.url}: {seen[key]} and {rel} would share the sample key {key}; rename one")
        seen[key] = rel
        label = label_of[rel.split("/", 1)[0]] if by_folder else -1
        ext = "jpg" if ext.lower() == "jpeg" else ext.lower()
        images.append(SourceImage(f"{root}/{rel}", size, label, key, ext))
    return classes, images


def describe(images: int, classes: int, layout: str) -> str:
    """`640 images, unlabelled (flat folder)` / `1,000 images, 10 classes (class folders)`."""
    return f"{images:,} images, " + (f"{classes} classes" if classes else "unlabelled") + f" ({layout})"
