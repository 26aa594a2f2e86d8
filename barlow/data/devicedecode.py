"""Decode a batch of encoded images on the training device, crop, resize and flip: the GPU-decode half of the data path.

The host reads bytes and chooses crop boxes from the image header; this module turns (bytes, box, flip) into the
uint8 (B, C, size, size) crops that barlow.augment.DeviceViews takes. On CUDA, baseline JPEGs with 1 or 3 components
decode as one batch with nvJPEG. What the header shows the GPU cannot take (PNG and other formats, CMYK,
progressive) the loader workers decode on the host (cropfirst.HostCrops), so it never reaches the training thread;
only an image nvJPEG rejects although its header looked fine decodes here per image on the CPU. An image no decoder
can read is reported in `bad` (its rows are left zero) and never fails the batch.

The nvJPEG race: its hardware engine writes a batch's outputs as soon as it is called, before work already queued
on the stream has run, into blocks of the caching allocator that queued kernels may still read. Every batched GPU
decode therefore drains the current stream first (`_gpu_batch`), whichever decoder runs, for any decoder version.
The feed (barlow.data.feed) decodes on its copy stream, one batch ahead: draining that stream waits for its copies
and the previous batch's crops only, never for a training step; blocks the training stream still reads are not
handed out again before it has (their tensors are `record_stream`ed to it), so nothing else can be overwritten.

Decoder: TorchCodec (`torchcodec.decoders.decode_jpeg` / `decode_image`, 0.17+: `decode_jpeg(list of 1-D uint8
CPU tensors, mode=..., device=...)` returns a list) where it loads and decodes a probe image on the device, else
`torchvision.io`; any exception while choosing means torchvision.io. torchvision 0.29 deprecates its decoders
("use TorchCodec instead") and warns on every call. TorchCodec's PyPI wheel is built for CUDA 13 (torch's PyPI
build); beside a torch built for another CUDA it does not load unless installed from that CUDA's PyTorch index, so
it is the optional extra `decode` and torchvision.io, always there and matched to torch, is the fallback.

Crop + resize: torchvision's `resized_crop` with BICUBIC + antialias, as the host's crop-first path
(barlow/data/cropfirst.py) does, so CPU and device decoding give the same crop up to rounding.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from PIL import Image
from torchvision.transforms import v2

from barlow.augment import to_device
from barlow.data.decode import gpu_decodable


def _mode(channels: int) -> str:
    return "RGB" if channels == 3 else "GRAY"


class Decoders(NamedTuple):
    name: str
    image: Callable[[torch.Tensor, int], torch.Tensor]  # (bytes, channels) -> (C, H, W) or (N, C, H, W), CPU
    jpegs: Callable[[list[torch.Tensor], int, torch.device], list[torch.Tensor]]  # one batch on a device


def _torchcodec() -> Decoders:
    from torchcodec.decoders import decode_image, decode_jpeg  # ImportError / OSError where its wheel cannot load

    return Decoders("torchcodec", lambda data, c: decode_image(data, mode=_mode(c)),
                    lambda datas, c, device: decode_jpeg(datas, mode=_mode(c), device=device))


def _torchvision() -> Decoders:
    from torchvision import io as tvio

    def quiet(fn: Callable) -> Callable:
        def call(*args):
            with warnings.catch_warnings():  # deprecated in torchvision 0.29: we know, and say so in the module doc
                warnings.simplefilter("ignore", DeprecationWarning)
                return fn(*args)
        return call

    mode = {3: tvio.ImageReadMode.RGB, 1: tvio.ImageReadMode.GRAY}
    return Decoders("torchvision", quiet(lambda data, c: tvio.decode_image(data, mode=mode[c])),
                    quiet(lambda datas, c, device: tvio.decode_jpeg(datas, mode=mode[c], device=device)))


def _probe_jpeg() -> torch.Tensor:
    """A tiny baseline JPEG (16x16 RGB) to try a decoder on."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buf, format="JPEG", quality=90)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _probe(dec: Decoders, device: torch.device) -> None:
    """Decode the tiny JPEG on the CPU and, for CUDA, as a one-image batch on the device; raises if it goes wrong."""
    data = _probe_jpeg()
    if tuple(dec.image(data, 3).shape) != (3, 16, 16):
        raise RuntimeError(f"{dec.name}: the probe image decoded to the wrong shape")
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # sync: once, when the decoder is chosen (see decode_batch)
        out = dec.jpegs([data], 3, device)
        if len(out) != 1 or tuple(out[0].shape) != (3, 16, 16) or out[0].device != device:
            raise RuntimeError(f"{dec.name}: the probe image decoded to the wrong shape or device")


@functools.cache
def decoders(name: str | None = None, device: torch.device | None = None) -> Decoders:
    """The named decoders ("torchcodec" or "torchvision"); None: TorchCodec where it loads and decodes a probe image
    (on `device` too, when that is CUDA), else torchvision.io."""
    if name is not None:
        return {"torchcodec": _torchcodec, "torchvision": _torchvision}[name]()
    try:
        dec = _torchcodec()
        _probe(dec, device or torch.device("cpu"))
        return dec
    except Exception as e:  # any failure (missing wheel, CUDA mismatch, an API that changed): the fallback decodes
        logging.getLogger(__name__).info("torchcodec not used (%s: %s); decoding with torchvision.io",
                                         type(e).__name__, e)
        return _torchvision()


def _channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """Where a decoder ignored the mode (torchvision's WebP gives RGB for GRAY): drop alpha, convert to `channels`."""
    if img.shape[0] == channels:
        return img
    img = img[:3] if img.shape[0] == 4 else img[:1] if img.shape[0] == 2 else img
    if img.shape[0] == channels:
        return img
    return v2.functional.rgb_to_grayscale(img) if channels == 1 else img.expand(3, -1, -1).contiguous()


def _decode_cpu(data: torch.Tensor, channels: int, dec: Decoders) -> torch.Tensor | None:
    """One image on the CPU: the decoders for any format they know, then PIL; None if neither can read it."""
    try:
        img = dec.image(data, channels)
        return _channels(img[0] if img.ndim == 4 else img, channels)  # animated formats: the first frame
    except Exception:  # any decoder failure: PIL is the last resort
        pass
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            return v2.functional.pil_to_tensor(im.convert("RGB" if channels == 3 else "L"))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _gpu_batch(dec: Decoders, datas: list[torch.Tensor], channels: int, device: torch.device) -> list[torch.Tensor]:
    """One nvJPEG batch. nvJPEG's hardware engine writes its outputs before work already queued on the stream has
    run, and those outputs come from the caching allocator (blocks that queued kernels may still read), so the
    stream is drained first: cheap, as the decoder synchronises the stream before it returns anyway."""
    torch.cuda.current_stream(device).synchronize()  # sync: before every batched hardware decode (see above)
    return dec.jpegs(datas, channels, device)


def decode_batch(encoded: Sequence[torch.Tensor], channels: int, device: torch.device | str,
                 decoder: str | None = None, gpu_ok: Sequence[bool] | None = None) -> list[torch.Tensor | None]:
    """Full-size uint8 (C, H, W) images on `device` (None where undecodable): one nvJPEG batch on CUDA for what it
    takes, per-image CPU decoding for the rest (and for all on the CPU). `gpu_ok`: which images the batched GPU
    decoder takes, where the host has read that from the headers already (None: read here)."""
    device = torch.device(device)
    dec = decoders(decoder, device if decoder is None else None)
    out: list[torch.Tensor | None] = [None] * len(encoded)
    todo = list(range(len(encoded)))
    if device.type == "cuda":
        gpu = [i for i in todo if (gpu_ok[i] if gpu_ok is not None else gpu_decodable(encoded[i]))]
        if gpu:
            try:
                for i, img in zip(gpu, _gpu_batch(dec, [encoded[i] for i in gpu], channels, device), strict=True):
                    out[i] = img
            except Exception:  # one bad image fails nvJPEG's batch: retry one by one on the GPU
                for i in gpu:
                    try:
                        out[i] = _gpu_batch(dec, [encoded[i]], channels, device)[0]
                    except Exception:
                        pass
        todo = [i for i in todo if out[i] is None]
    for i in todo:  # rare on CUDA: the loader workers decode on the host what the header shows the GPU cannot take
        img = _decode_cpu(encoded[i], channels, dec)
        if img is not None:
            out[i] = to_device(img, device) if device.type != "cpu" else img
    return out


def _crop(img: torch.Tensor, box: Sequence[int], flip: bool, size: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    top, left = min(max(int(box[0]), 0), h - 1), min(max(int(box[1]), 0), w - 1)
    height, width = max(1, min(int(box[2]), h - top)), max(1, min(int(box[3]), w - left))
    out = v2.functional.resized_crop(img, top, left, height, width, [size, size],
                                     interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return out.flip(-1) if flip else out


def decode_views(encoded: Sequence[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int,
                 channels: int, device: torch.device | str, decoder: str | None = None,
                 gpu_ok: Sequence[bool] | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """Each image decoded once, then V crops of it: boxes (V, B, 4) as (top, left, height, width) in full-resolution
    pixels, flips (V, B) bool (both CPU tensors) -> V uint8 (B, C, size, size) batches on `device`, and the indices
    of the undecodable images (their rows are zero: drop them). `gpu_ok` as in decode_batch."""
    if boxes.ndim != 3 or boxes.shape[1:] != (len(encoded), 4) or flips.shape != boxes.shape[:2]:
        raise ValueError(f"boxes, flips: expected (V, {len(encoded)}, 4) and (V, {len(encoded)}) "
                         f"(got {tuple(boxes.shape)}, {tuple(flips.shape)})")
    if channels not in (1, 3):
        raise ValueError(f"channels: must be 1 or 3 (got {channels})")
    device = torch.device(device)
    images = decode_batch(encoded, channels, device, decoder, gpu_ok)
    boxes, flips = boxes.tolist(), flips.tolist()  # host values: no device sync per crop
    views = [torch.zeros(len(encoded), channels, size, size, dtype=torch.uint8, device=device) for _ in boxes]
    bad = []
    for i, img in enumerate(images):
        if img is None:
            bad.append(i)
            continue
        for v, out in enumerate(views):
            out[i] = _crop(img, boxes[v][i], flips[v][i], size)
    return views, bad


def decode_crops(encoded: Sequence[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int, channels: int,
                 device: torch.device | str, decoder: str | None = None) -> tuple[torch.Tensor, list[int]]:
    """encoded (B 1-D uint8 tensors), boxes (B, 4) top, left, height, width in full-resolution pixels, flips (B,)
    -> uint8 (B, C, size, size) on `device` and the indices of undecodable images (their rows are zero).
    `decoder`: "torchcodec" or "torchvision" to force one (tests, benchmarks); None picks as the module doc says."""
    views, bad = decode_views(encoded, boxes[None], flips[None], size, channels, device, decoder)
    return views[0], bad
