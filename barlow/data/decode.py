"""Turning stored bytes into a PIL image, the one place a corrupt file is recognised.

JPEGs can be decoded at 1/2, 1/4 or 1/8 of their size (PIL's draft mode: libjpeg scales in the DCT, which
is several times faster than decoding at full size and resizing); `min_size` says how small is still enough.
`decode_pixels` gives the same pixels as a tensor, full-size RGB/gray JPEGs through torchvision.io (no PIL
image, no conversion); PNG, CMYK, other modes and reduced decodes stay with PIL. `gpu_decodable` tells from the
header alone whether the batched GPU decoder takes an image. Every decoder here gives the stored frame: EXIF
orientation is not applied (the crop boxes are drawn on the frame size the header gives).
"""

from __future__ import annotations

import io
import struct
import warnings
from typing import NamedTuple

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor

_SOF_BASELINE = (0xC0, 0xC1)  # baseline and extended sequential Huffman: what nvJPEG's batched decoder takes
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_HEADER_BYTES = 65536  # frame headers sit after the APPn segments, which are at most 64 KiB each in practice
_U16 = struct.Struct(">H").unpack_from  # a segment's length
_SOF_FIELDS = struct.Struct(">BHHB").unpack_from  # precision, height, width, components


class JpegFrame(NamedTuple):
    marker: int  # the SOF marker: 0xC0 baseline, 0xC2 progressive, ...
    components: int  # 1 grey, 3 YCbCr, 4 CMYK
    height: int
    width: int
    orientation: int = 1  # EXIF orientation (1-8): 1 where absent; barlow decodes the stored frame whatever it says


_FRAME_MODES = {1: "L", 3: "RGB"}  # the mode PIL opens a JPEG of 1 or 3 components in


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


# (stored mode, wanted mode) pairs where torchvision's libjpeg-turbo decode gives PIL's pixels exactly (tested)
_SAME_AS_PIL = {("RGB", "RGB"), ("L", "L"), ("L", "RGB")}


def decode_pixels(data: bytes, img: Image.Image | JpegFrame, name: str, channels: int = 3,
                  min_size: tuple[int, int] | None = None) -> torch.Tensor:
    """`decode_image(img, ...)` as a CHW uint8 tensor, `img` opened from `data` (or a JPEG's frame header, where
    PIL has not opened it). A JPEG at full size whose mode needs no PIL conversion is decoded by torchvision
    straight to a tensor: ~4x cheaper."""
    mode = "RGB" if channels == 3 else "L"
    stored = _FRAME_MODES.get(img.components) if isinstance(img, JpegFrame) else (
        img.mode if img.format == "JPEG" else None)
    if min_size is None and (stored, mode) in _SAME_AS_PIL:
        try:
            with warnings.catch_warnings():  # torchvision.io's decoders are deprecated from 0.29 (pinned here)
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                   mode=ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY)
        except Exception as e:  # truncated data, bad Huffman tables, ...: all mean "corrupt"
            raise CorruptImage(f"{name}: cannot decode image ({e})") from None
    return pil_to_tensor(decode_image(open_image(data, name) if isinstance(img, JpegFrame) else img, name, channels,
                                      min_size))


def image_size(img: Image.Image | JpegFrame) -> tuple[int, int]:
    """(width, height) of an opened image or of a JPEG's frame header."""
    return (img.width, img.height) if isinstance(img, JpegFrame) else img.size


def jpeg_frame(data: torch.Tensor | bytes | bytearray | memoryview) -> JpegFrame | None:
    """The frame header of a JPEG, or None when it is not a JPEG / the header is cut / the size is left to a DNL."""
    # read in place, never copied: this runs per image on the host part of the GPU data path
    b = data if isinstance(data, bytes | bytearray) else memoryview(
        data.numpy() if isinstance(data, torch.Tensor) else data).cast("B")
    end = min(len(b), _HEADER_BYTES)
    if end < 2 or b[0] != 0xFF or b[1] != 0xD8:
        return None
    i, orientation = 2, 1
    while i + 4 <= end:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            if i + 9 >= end:
                return None
            _, height, width, components = _SOF_FIELDS(b, i + 4)  # after the marker and the length
            return JpegFrame(marker, components, height, width, orientation) if height and width else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        length = _U16(b, i + 2)[0]
        if marker == 0xE1 and orientation == 1:  # APP1: EXIF, where an orientation tag sits
            orientation = _exif_orientation(b, i + 4, min(i + 2 + length, end))
        i += 2 + length
    return None


_EXIF = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112


def _exif_orientation(b, start: int, end: int) -> int:
    """The orientation tag of IFD0 in an APP1 segment's bytes [start, end), or 1 (absent, malformed, not EXIF)."""
    tiff = start + len(_EXIF)
    if end - tiff < 8 or bytes(b[start:tiff]) != _EXIF or bytes(b[tiff:tiff + 2]) not in (b"II", b"MM"):
        return 1
    order = "<" if b[tiff] == 0x49 else ">"
    ifd = tiff + struct.unpack_from(order + "I", b, tiff + 4)[0]
    if ifd + 2 > end:
        return 1
    for k in range(struct.unpack_from(order + "H", b, ifd)[0]):
        entry = ifd + 2 + 12 * k
        if entry + 12 > end:
            return 1
        tag, kind = struct.unpack_from(order + "HH", b, entry)
        if tag == _ORIENTATION_TAG:
            value = struct.unpack_from(order + "H", b, entry + 8)[0] if kind == 3 else 1  # 3: SHORT
            return value if 1 <= value <= 8 else 1
    return 1


def gpu_decodable(data: torch.Tensor | bytes | bytearray | memoryview) -> bool:
    """True for a baseline JPEG with 1 or 3 components (what the batched GPU decoder takes)."""
    return gpu_takes(jpeg_frame(data))


def gpu_takes(frame: JpegFrame | None) -> bool:
    """Baseline, 1 or 3 components, and no EXIF rotation: torchcodec's decoders (GPU and CPU) always apply the EXIF
    orientation, while the crop boxes are drawn on the stored frame and PIL / torchvision.io decode that frame; so an
    image with orientation != 1 takes the host path, the same frame whichever decoder is installed."""
    return frame is not None and frame.marker in _SOF_BASELINE and frame.components in (1, 3) and frame.orientation == 1


def draft_scale(width: int, height: int, min_size: tuple[int, int]) -> int:
    """The reduction (1, 2, 4 or 8) PIL's JPEG draft picks for `min_size`, without decoding anything."""
    scale = min(width // max(1, min_size[0]), height // max(1, min_size[1]))
    return next(s for s in (8, 4, 2, 1) if scale >= s)
