"""The demo image set: scikit-learn's bundled handwritten digits as an ImageNet-style folder of real JPEGs."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from barlow import storage

VAL_EVERY = 5  # every 5th image of a class goes to val: about 1440 train / 357 val images


def write_demo(dst: str, size: int = 32) -> dict[str, int]:
    """Write `train/<digit>/*.jpg` and `val/<digit>/*.jpg` under `dst` (any fsspec URL); returns image counts."""
    from sklearn.datasets import load_digits  # ships with scikit-learn, no download

    digits = load_digits()
    counts = {"train": 0, "val": 0}
    seen: dict[int, int] = {}
    for pixels, label in zip(digits.images, digits.target, strict=True):
        k = seen[label] = seen.get(label, -1) + 1
        split = "val" if k % VAL_EVERY == 0 else "train"
        img = Image.fromarray(np.uint8(pixels * (255 / 16))).resize((size, size), Image.BICUBIC)
        buf = _jpeg(img)
        storage.write_bytes(storage.join(dst, split, str(label), f"{label}_{k:04d}.jpg"), buf)
        counts[split] += 1
    return counts


def _jpeg(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=95)
    return out.getvalue()
