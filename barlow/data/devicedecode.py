"""Decode a batch of encoded images on the training device, crop, resize and flip: the GPU-decode half of the data path.

The host reads bytes and chooses crop boxes from the image header; this module turns (bytes, box, flip) into the
uint8 (B, C, size, size) crops that barlow.augment.DeviceViews takes. On CUDA, baseline JPEGs with 1 or 3 components
decode as one batch with nvJPEG. What the header shows the GPU cannot take (PNG and other formats, CMYK,
progressive) the loader workers decode on the host (barlow.augment.HostCrops), so it never reaches the training thread;
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
(barlow.augment.HostCrops) does, so CPU and device decoding give the same crop up to rounding; batched (the crop
and resize are a separable linear map: two matmuls per view for a group of similar-sized images), so a batch costs a
few launches, not one per image and view.
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
from barlow.data.decode import gpu_decodable, jpeg_frame


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
    """One image on the CPU: the decoders for any format they know, then PIL; None if neither can read it. A JPEG
    with an EXIF orientation goes to PIL, which decodes the stored frame as the host path does (TorchCodec rotates)."""
    frame = jpeg_frame(data)
    try:
        if frame is None or frame.orientation == 1:
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


def _clamped(box: Sequence[int], h: int, w: int) -> tuple[int, int, int, int]:
    """A (top, left, height, width) box moved inside an h x w image, at least 1 px."""
    top, left = min(max(int(box[0]), 0), h - 1), min(max(int(box[1]), 0), w - 1)
    return top, left, max(1, min(int(box[2]), h - top)), max(1, min(int(box[3]), w - left))


def _resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, full: int,
                    flip: torch.Tensor | None = None) -> torch.Tensor:
    """(B, size, full) float32: row k of b holds the weights torch's antialiased bicubic resize (interpolate with
    antialias=True: cubic a = -0.5, align_corners=False, support widened by the scale when shrinking) gives the
    pixels [start, start + length) of a line of `full` pixels for output pixel k; reversed rows where `flip`."""
    dev, f32 = start.device, torch.float32
    length = length.to(f32)
    scale = length / size
    shrink = scale >= 1
    support = torch.where(shrink, 2 * scale, 2.0)[:, None]
    invscale = torch.where(shrink, 1 / scale, 1.0)[:, None, None]
    centre = scale[:, None] * (torch.arange(size, device=dev, dtype=f32) + 0.5)  # (B, size), crop coordinates
    lo = (centre - support + 0.5).trunc().clamp(min=0)[..., None]
    hi = torch.minimum((centre + support + 0.5).trunc(), length[:, None])[..., None]
    p = (torch.arange(full, device=dev, dtype=f32) - start.to(f32)[:, None])[:, None, :]  # (B, 1, full)
    t = ((p - centre[..., None] + 0.5) * invscale).abs()
    cubic = torch.where(t < 1, (1.5 * t - 2.5) * t * t + 1, torch.where(t < 2, (((t - 5) * t + 8) * t - 4) * -0.5, 0.0))
    w = cubic * ((p >= lo) & (p < hi))
    w = w / w.sum(-1, keepdim=True)
    if flip is not None:
        w = torch.where(flip[:, None, None], w.flip(1), w)
    return w


_GROUP_PIXELS = 1 << 26  # a group's padded float copy: at most 256 MiB
_GROUP_PADDING = 1.5  # and at most this much bigger than its images


def _groups(sizes: list[tuple[int, int]], channels: int) -> list[list[int]]:
    """Indices of images padded to one common size for a batched resize: landscape and portrait apart, each by
    height then width, largest first; a group is closed where padding would pass _GROUP_PADDING or the group
    _GROUP_PIXELS (a batch of similar sizes is one group or a few)."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i][0] > sizes[i][1], -sizes[i][0], -sizes[i][1]))
    groups: list[list[int]] = []
    hp = wp = area = 0
    for i in order:
        h, w = sizes[i]
        if groups:
            n, h2, w2 = len(groups[-1]) + 1, max(hp, h), max(wp, w)
            if n * h2 * w2 <= _GROUP_PADDING * (area + h * w) and n * h2 * w2 * channels <= _GROUP_PIXELS:
                groups[-1].append(i)
                hp, wp, area = h2, w2, area + h * w
                continue
        groups.append([i])
        hp, wp, area = h, w, h * w
    return groups


def _resized_crops(images: list[torch.Tensor], boxes: list[list[list[int]]], flips: list[list[bool]], size: int,
                   views: list[torch.Tensor], rows: list[int]) -> None:
    """Every view's crops of `images` (uint8 (C, H, W) on one device) into views[v][rows[i]]: per group of similar
    sizes (`_groups`) one padded float copy, then per view two batched matmuls with the separable weights of
    torchvision's resized_crop (bicubic, antialias: `_resize_weights`), rounded and clamped as it does. One resize
    per view per group, not one per image; equal to the per-image resized_crop up to float rounding."""
    device, channels = images[0].device, images[0].shape[0]
    for group in _groups([tuple(img.shape[-2:]) for img in images], channels):
        hp, wp = max(images[i].shape[-2] for i in group), max(images[i].shape[-1] for i in group)
        padded = torch.zeros(len(group), channels, hp, wp, dtype=torch.float32, device=device)
        for j, i in enumerate(group):
            padded[j, :, :images[i].shape[-2], :images[i].shape[-1]] = images[i]
        out_rows = to_device(torch.tensor([rows[i] for i in group], dtype=torch.long), device)
        for v, out in enumerate(views):
            cut = torch.tensor([_clamped(boxes[v][i], *images[i].shape[-2:]) for i in group], dtype=torch.long)
            flip = to_device(torch.tensor([flips[v][i] for i in group], dtype=torch.bool), device)
            cut = to_device(cut, device)
            wy = _resize_weights(cut[:, 0], cut[:, 2], size, hp)  # (G, size, hp)
            wx = _resize_weights(cut[:, 1], cut[:, 3], size, wp, flip)  # (G, size, wp)
            crops = wy[:, None] @ padded @ wx[:, None].transpose(-1, -2)  # (G, C, size, size)
            out.index_copy_(0, out_rows, crops.clamp_(0, 255).round_().to(torch.uint8))


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
    views = [torch.zeros(len(encoded), channels, size, size, dtype=torch.uint8, device=device) for _ in range(len(boxes))]
    good = [i for i, img in enumerate(images) if img is not None]
    if good:  # boxes and flips as host values: the per-image clamping needs no device sync
        box_list, flip_list = boxes.tolist(), flips.tolist()
        _resized_crops([images[i] for i in good], [[b[i] for i in good] for b in box_list],
                       [[f[i] for i in good] for f in flip_list], size, views, good)
    return views, [i for i, img in enumerate(images) if img is None]


def decode_crops(encoded: Sequence[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int, channels: int,
                 device: torch.device | str, decoder: str | None = None) -> tuple[torch.Tensor, list[int]]:
    """encoded (B 1-D uint8 tensors), boxes (B, 4) top, left, height, width in full-resolution pixels, flips (B,)
    -> uint8 (B, C, size, size) on `device` and the indices of undecodable images (their rows are zero).
    `decoder`: "torchcodec" or "torchvision" to force one (tests, benchmarks); None picks as the module doc says."""
    views, bad = decode_views(encoded, boxes[None], flips[None], size, channels, device, decoder)
    return views[0], bad
