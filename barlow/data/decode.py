"""Turning stored bytes into a PIL image, the one place a corrupt file is recognised."""

from __future__ import annotations

import io

from PIL import Image


class CorruptImage(Exception):
    """An image that cannot be decoded; the message names it."""


def decode_image(data: bytes, name: str, channels: int = 3) -> Image.Image:
    """Decode JPEG/PNG bytes to an RGB (channels=3) or L (channels=1) image."""
    try:
        img = Image.open(io.BytesIO(data))
        img = img.convert("RGB" if channels == 3 else "L")
    except Exception as e:  # PIL raises many types for bad input; all mean "corrupt"
        raise CorruptImage(f"{name}: cannot decode image ({e})") from None
    return img
