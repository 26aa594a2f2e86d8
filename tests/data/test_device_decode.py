"""barlow.data.devicedecode on the CPU: the decoded crops equal the host's crop of a PIL decode, every format the GPU
decoder cannot take still decodes (per image, on the CPU), and an undecodable image is reported, never raised.
The CUDA half is tests/gpu/test_devicedecode.py."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from device_decoders import DECODERS
from PIL import Image
from torchvision.transforms import v2

from barlow.data.decode import decode_pixels, gpu_decodable, jpeg_frame
from barlow.data.devicedecode import _clamped, _groups, _resized_crops, decode_batch, decode_crops, decode_views

W, H = 96, 72


def photo(mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth image (JPEG-friendly, so decoders agree closely) with some colour."""
    yy, xx = np.mgrid[0:H, 0:W]
    rng = np.random.default_rng(seed)
    rgb = np.stack([128 + 100 * np.sin(xx / 9 + rng.uniform(0, 6)), 128 + 100 * np.cos(yy / 7 + rng.uniform(0, 6)),
                    (xx + yy) * 255 / (W + H)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def encode(img: Image.Image, fmt: str, **kw) -> torch.Tensor:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def host_crop(img: Image.Image, box, flip: bool, size: int, channels: int) -> torch.Tensor:
    """What the host's crop-first path does: PIL decode, convert, torchvision's resized_crop (bicubic, antialias)."""
    t = v2.functional.pil_to_tensor(img.convert("RGB" if channels == 3 else "L"))
    out = v2.functional.resized_crop(t, *box, [size, size], interpolation=v2.InterpolationMode.BICUBIC,
                                     antialias=True)
    return out.flip(-1) if flip else out


# the device's float resize against the host's uint8 kernel: +-1 where they round differently; grey: TorchCodec's
# RGB -> L conversion rounds differently from PIL's
LOSSLESS = {3: (0.05, 1), 1: (0.6, 2)}
CASES = [  # name, encoded bytes, the GPU batch decoder takes it, tolerance (mean, max) in uint8 levels
    ("baseline jpeg", lambda: encode(photo(), "JPEG", quality=95), True, (1.0, 8)),
    ("grey jpeg", lambda: encode(photo("L"), "JPEG", quality=95), True, (1.0, 8)),
    ("progressive jpeg", lambda: encode(photo(), "JPEG", quality=95, progressive=True), False, (1.0, 8)),
    ("cmyk jpeg", lambda: encode(photo("CMYK"), "JPEG", quality=95), False, (1.5, 12)),
    ("png", lambda: encode(photo(), "PNG"), False, None),
    ("rgba png", lambda: encode(photo("RGBA"), "PNG"), False, None),
    ("webp lossless", lambda: encode(photo(), "WEBP", lossless=True), False, None),
]


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name,make,gpu_ok,tol", CASES, ids=[c[0] for c in CASES])
def test_crop_equals_host_crop_of_pil_decode(name, make, gpu_ok, tol, channels, decoder):
    data = make()
    assert gpu_decodable(data) is gpu_ok
    boxes = torch.tensor([[5, 10, 50, 60], [0, 0, H, W], [30, 40, 20, 20]])
    flips = torch.tensor([True, False, True])
    out, bad = decode_crops([data] * 3, boxes, flips, 32, channels, "cpu", decoder)
    assert bad == [] and out.shape == (3, channels, 32, 32) and out.dtype == torch.uint8
    with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
        want = torch.stack([host_crop(img, b.tolist(), bool(f), 32, channels) for b, f in zip(boxes, flips,
                                                                                              strict=True)])
    diff = (out.int() - want.int()).abs()
    tol = tol or LOSSLESS[channels]
    assert diff.float().mean() <= tol[0] and diff.max() <= tol[1], (diff.float().mean(), diff.max())


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("junk", [b"", b"not an image", b"\xff\xd8\xff\xe0" + b"\x00" * 40, "truncated"])
def test_undecodable_images_are_reported_not_raised(junk, decoder):
    good = encode(photo(), "JPEG", quality=90)
    bad_data = good[:300] if junk == "truncated" else torch.frombuffer(bytearray(junk or b"\x00"), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, H, W]] * 3)
    out, bad = decode_crops([good, bad_data, good], boxes, torch.zeros(3, dtype=torch.bool), 16, 3, "cpu", decoder)
    assert bad == [1]
    assert out[1].eq(0).all() and out[0].float().mean() > 10 and torch.equal(out[0], out[2])


def test_views_decode_once_and_crop_each_view():
    data = [encode(photo(seed=s), "JPEG", quality=95) for s in range(4)]
    boxes = torch.tensor([[[0, 0, H, W]] * 4, [[10, 20, 30, 40]] * 4])
    flips = torch.tensor([[False] * 4, [True, False, True, False]])
    (a, b), bad = decode_views(data, boxes, flips, 24, 3, "cpu")
    assert bad == []
    for v, out in enumerate((a, b)):
        single, _ = decode_crops(data, boxes[v], flips[v], 24, 3, "cpu")
        assert torch.equal(out, single)
    assert not torch.equal(a, b)


def test_boxes_outside_the_image_are_clamped():
    data = encode(photo(), "PNG")
    out, bad = decode_crops([data], torch.tensor([[H - 5, W - 5, 500, 500]]), torch.tensor([False]), 8, 3, "cpu")
    want = host_crop(photo(), [H - 5, W - 5, 5, 5], False, 8, 3)
    assert bad == [] and (out[0].int() - want.int()).abs().max() <= 1


@pytest.mark.parametrize("boxes,flips", [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.bool)),
                                         (torch.zeros(3, 4), torch.zeros(3, dtype=torch.bool)),
                                         (torch.zeros(2, 4), torch.zeros(1, dtype=torch.bool))])
def test_bad_shapes_name_the_arguments(boxes, flips):
    data = [encode(photo(), "PNG")] * 2
    with pytest.raises(ValueError, match="boxes, flips"):
        decode_crops(data, boxes, flips, 8, 3, "cpu")


@pytest.mark.parametrize("data,frame", [
    (lambda: encode(photo(), "JPEG"), (0xC0, 3)),
    (lambda: encode(photo("L"), "JPEG"), (0xC0, 1)),
    (lambda: encode(photo(), "JPEG", progressive=True), (0xC2, 3)),
    (lambda: encode(photo("CMYK"), "JPEG"), (0xC0, 4)),
    (lambda: encode(photo(), "PNG"), None),
    (lambda: torch.tensor([0xFF, 0xD8, 0xFF], dtype=torch.uint8), None),
])
def test_jpeg_frame_reads_the_header(data, frame):
    got = jpeg_frame(data())
    assert (got if got is None else got[:2]) == frame
    if got is not None:
        assert (got.height, got.width) == (H, W)


def test_torchvision_decoders_do_not_warn():
    data = encode(photo(), "JPEG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_crops([data], torch.tensor([[0, 0, H, W]]), torch.tensor([False]), 8, 3, "cpu", "torchvision")


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview, torch.Tensor])
def test_jpeg_frame_reads_any_buffer(kind):
    data = encode(photo(), "JPEG", progressive=True)
    buf = data if kind is torch.Tensor else kind(bytes(data.numpy()))
    assert jpeg_frame(buf) == (0xC2, 3, H, W, 1) and not gpu_decodable(buf)


def test_jpeg_frame_reads_a_view_not_a_copy():
    """The header is read through a view of the stored bytes: no list or copy of the first 64 KiB per image (the host
    part of GPU decoding runs it for every image of every batch)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))
    data = encode(noisy, "JPEG", quality=95, exif=b"Exif\x00\x00" + bytes(40_000))  # the frame header after 40 KB
    assert len(data) > 65536
    tracemalloc.start()
    try:
        assert jpeg_frame(data) == (0xC0, 3, 200, 200, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8192, f"{peak} bytes allocated to read one header"


def test_the_decoder_choice_falls_back_on_any_error_of_the_probe(monkeypatch):
    """TorchCodec is first where it loads and decodes a probe image; any exception there (here: a TypeError, as an API
    change would raise) chooses torchvision.io."""
    from barlow.data import devicedecode

    def broken():
        def image(data, channels):
            raise TypeError("decode_image() got an unexpected keyword argument 'mode'")

        return devicedecode.Decoders("torchcodec", image, lambda datas, c, device: [])

    devicedecode.decoders.cache_clear()
    monkeypatch.setattr(devicedecode, "_torchcodec", broken)
    try:
        assert devicedecode.decoders(None, torch.device("cpu")).name == "torchvision"
        working = devicedecode._torchvision()
        monkeypatch.setattr(devicedecode, "_torchcodec", lambda: working._replace(name="torchcodec"))
        devicedecode.decoders.cache_clear()
        assert devicedecode.decoders(None, torch.device("cpu")).name == "torchcodec"  # a probe that decodes: first
    finally:
        devicedecode.decoders.cache_clear()


def _per_image(img: torch.Tensor, box, flip: bool, size: int) -> torch.Tensor:
    """The per-image path the batched crops replace: torchvision's resized_crop of the clamped box, in float (as
    on CUDA), rounded and clamped to uint8 as torchvision does."""
    out = v2.functional.resized_crop(img.float(), *_clamped(box, *img.shape[-2:]), [size, size],
                                     interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return (out.flip(-1) if flip else out).clamp(0, 255).round().to(torch.uint8)


@pytest.mark.parametrize("size", [24, 7])
def test_batched_crops_equal_the_per_image_resized_crop(size):
    """Every image and view of a batch of mixed sizes, boxes (shrinking, enlarging, off the edge) and flips: the
    batched crop (two matmuls per view and group) is torchvision's per-image resized_crop up to float rounding."""
    g = torch.Generator().manual_seed(size)

    def randint(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    images, boxes, flips = [], [[], []], [[], []]
    for _ in range(40):
        h, w = randint(12, 150), randint(12, 150)
        images.append((torch.rand(3, h, w, generator=g) * 255).to(torch.uint8))
        for v in range(2):
            bh, bw = randint(1, h + 20), randint(1, w + 20)  # some past the edge: clamped
            boxes[v].append([randint(0, h), randint(0, w), bh, bw])
            flips[v].append(bool(randint(0, 2)))
    views = [torch.zeros(42, 3, size, size, dtype=torch.uint8) for _ in range(2)]
    rows = list(range(1, 41))  # the images' rows in the output; 0 and 41 untouched
    _resized_crops(images, boxes, flips, size, views, rows)
    for v in range(2):
        want = torch.stack([_per_image(img, boxes[v][i], flips[v][i], size) for i, img in enumerate(images)])
        diff = (views[v][1:41].int() - want.int()).abs()
        assert diff.max() <= 1 and diff.gt(0).float().mean() < 1e-3, (diff.max(), diff.gt(0).float().mean())
        assert views[v][0].eq(0).all() and views[v][41].eq(0).all()


@pytest.mark.parametrize("sizes, groups", [
    ([(375, 500)] * 8, 1),  # one size: one group, one resize per view for the batch
    ([(375, 500), (333, 500), (400, 500)] * 4 + [(500, 375)] * 4, 1),  # a mix padded within 1.5x: one group
    ([(375, 500)] * 8 + [(3000, 4000)], 2),  # a photo 64x the others' size goes alone
    ([(2000, 2000)] * 6, 2),  # the padded copy's cap (64 Mi values with 3 channels) splits a group
])
def test_images_of_a_batch_are_resized_in_few_groups(sizes, groups):
    got = _groups(sizes, 3)
    assert len(got) == groups and sorted(i for grp in got for i in grp) == list(range(len(sizes)))


def test_a_batch_of_imagenet_like_sizes_is_a_few_resizes_not_one_per_image():
    rng = np.random.default_rng(0)
    common = [(375, 500), (500, 375), (333, 500), (500, 333), (400, 500), (480, 640), (300, 400)]
    sizes = [common[i] for i in rng.integers(0, len(common), 256)]
    assert len(_groups(sizes, 3)) <= 4  # the padded copy's cap alone needs 3 (64 Mi values)


def rotated_jpeg(orientation: int) -> torch.Tensor:
    """A W x H baseline JPEG whose EXIF says to show it rotated (6: 90 degrees clockwise, so H x W on screen)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo(), "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_the_header_scan_reads_the_exif_orientation(orientation):
    frame = jpeg_frame(rotated_jpeg(orientation))
    assert frame == (0xC0, 3, H, W, orientation)
    assert gpu_decodable(rotated_jpeg(orientation)) is (orientation == 1)  # rotated ones take the host path


@pytest.mark.parametrize("decoder", DECODERS)
def test_an_exif_rotated_jpeg_decodes_to_its_stored_frame_with_every_decoder(decoder):
    """Orientation 6: every decoder gives the stored (C, H, W) frame, the one the host's boxes are drawn on and the
    loader workers' decode (decode.decode_pixels) gives, never the rotated one (TorchCodec would rotate)."""
    data = rotated_jpeg(6)
    host = decode_pixels(bytes(data.numpy()), jpeg_frame(data), "r.jpg")
    [img] = decode_batch([data], 3, "cpu", decoder)
    assert host.shape == img.shape == (3, H, W)
    assert (img.int() - host.int()).abs().max() <= 8  # decoders differ in rounding, not in geometry
