"""Turning stored bytes into a PIL image, the one place a corrupt file is recognised.

JPEGs can be decoded at 1/2, 1/4 or 1/8 of their size (PIL's draft mode: libjpeg scales in the DCT, which
is several times faster than decoding at full size and resizing); `min_size` says how small is still enough.
"""

from __future__ import annotations

import io

from PIL import Image


class CorruptImage(Exception):
    """An image that cannot be decoded; the message names it."""


def open_image(data: bytes, name: str) -> Image.Image:
    """A lazily decoded image: its size and format are read from the header only."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many types for bad input; all mean "corrupt"
        raise CorruptImage(f"{name}: cannot decode image ({e})") from None


def decode_image(data: bytes | Image.Image, name: str, channels: int = 3,
                 min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode JPEG/PNG bytes (or an opened image) to RGB (channels=3) or L (channels=1).

    With `min_size` (width, height), a JPEG is decoded at the largest DCT reduction whose result is still at
    least that big; other formats decode at full size.
    """
    mode = "RGB" if channels == 3 else "L"
    img = data if isinstance(data, Image.Image) else open_image(data, name)
    try:
        if min_size is not None and img.format == "JPEG":
            img.draft(mode, (max(1, min_size[0]), max(1, min_size[1])))
        return img.convert(mode)
    except Exception as e:  # truncated data, bad Huffman tables, ...: all mean "corrupt"
        raise CorruptImage(f"{name}: cannot decode image ({e})") from None


def draft_scale(width: int, height: int, min_size: tuple[int, int]) -> int:
    """The reduction (1, 2, 4 or 8) PIL's JPEG draft picks for `min_size`, without decoding anything."""
    scale = min(width // max(1, min_size[0]), height // max(1, min_size[1]))
    return next(s for s in (8, 4, 2, 1) if scale >= s)
