"""CUDA half of the device data path (skipped without a GPU): nvJPEG batch decode equals the CPU decode, the formats
nvJPEG cannot take fall back per image and land on the device, and DeviceViews gives the same views on CUDA as on
the CPU for the same seed."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from device_decoders import DECODERS
from PIL import Image
from reference_views import VariantViews

from barlow.augment import ViewsConfig
from barlow.data.devicedecode import decode_crops, decode_views, gpu_decodable

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")



def encode(img: Image.Image, fmt: str, **kw) -> torch.Tensor:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def photo(seed: int, mode: str = "RGB", w: int = 160, h: int = 120) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    rgb = np.stack([128 + 100 * np.sin(xx / 9 + rng.uniform(0, 6)), 128 + 100 * np.cos(yy / 7 + rng.uniform(0, 6)),
                    (xx + yy) * 255 / (w + h)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def mixed_batch() -> list[torch.Tensor]:
    return [encode(photo(0), "JPEG", quality=92), encode(photo(1, "L"), "JPEG", quality=92),
            encode(photo(2), "JPEG", quality=92, progressive=True), encode(photo(3, "CMYK"), "JPEG", quality=92),
            encode(photo(4), "PNG"), torch.tensor([1, 2, 3], dtype=torch.uint8),
            encode(photo(5), "JPEG", quality=92)[:400], encode(photo(6), "JPEG", quality=92)]


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("channels", [3, 1])
def test_gpu_decode_equals_cpu_decode_with_fallbacks(channels, decoder):
    data = mixed_batch()
    n = len(data)
    boxes = torch.tensor([[10, 20, 90, 120]] * n)
    flips = torch.tensor([i % 2 == 0 for i in range(n)])
    gpu, bad_gpu = decode_crops(data, boxes, flips, 64, channels, "cuda", decoder)
    cpu, bad_cpu = decode_crops(data, boxes, flips, 64, channels, "cpu", decoder)
    assert gpu.device.type == "cuda" and gpu.shape == (n, channels, 64, 64) and gpu.dtype == torch.uint8
    for bad in (bad_gpu, bad_cpu):  # the junk bytes; the cut JPEG (6) may decode partly on one and not the other
        assert {5} <= set(bad) <= {5, 6}
    diff = (gpu.cpu().int() - cpu.int()).abs().float()
    good = [i for i in range(n) if i not in (5, 6)]
    # nvJPEG's IDCT / chroma upsampling and the float CUDA resize differ from libjpeg-turbo + uint8 CPU resize a little
    assert diff[good].mean() < 2.0 and diff[good].amax() <= 40


@pytest.mark.parametrize("decoder", DECODERS)
def test_one_bad_jpeg_does_not_fail_the_gpu_batch(decoder):
    good = [encode(photo(s), "JPEG", quality=90) for s in range(6)]
    broken = good[0][:300].clone()  # cut inside the Huffman tables: the frame header still says baseline JPEG
    assert gpu_decodable(broken)  # so it goes into nvJPEG's batch and fails it
    data = [*good[:3], broken, *good[3:]]
    boxes = torch.tensor([[[0, 0, 120, 160]] * len(data)] * 2)
    flips = torch.zeros(2, len(data), dtype=torch.bool)
    (a, b), bad = decode_views(data, boxes, flips, 32, 3, "cuda", decoder)
    assert bad == [3] and a[3].eq(0).all()
    assert all(a[i].float().mean() > 10 for i in range(len(data)) if i != 3)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("hue", ["hsv", "linear"])
def test_device_views_on_cuda_equal_cpu(channels, hue):
    views = VariantViews(ViewsConfig(64, channels), hue=hue)  # hsv: the library's DeviceViews
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randint(0, 256, (32, channels, 64, 64), dtype=torch.uint8, generator=gen)
    x2 = torch.randint(0, 256, (32, channels, 64, 64), dtype=torch.uint8, generator=gen)
    c1, c2 = views(x1, x2, seed=5)
    g1, g2 = views.to("cuda")(x1.cuda(), x2.cuda(), seed=5)
    for c, g in ((c1, g1), (c2, g2)):
        assert g.device.type == "cuda" and g.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(g.cpu(), c, atol=1e-4, rtol=0)


@pytest.mark.parametrize("decoder", DECODERS)
def test_an_exif_rotated_jpeg_decodes_to_its_stored_frame_on_cuda(decoder):
    """Orientation 6 (TorchCodec's GPU decoder would rotate it): the header routes it off the batched GPU decode, so
    the device gives the stored (C, H, W) frame the host's boxes are drawn on, as the CPU does."""
    from barlow.data.devicedecode import decode_batch

    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photo(7), "JPEG", quality=92, exif=exif.tobytes())
    assert not gpu_decodable(data)
    [gpu] = decode_batch([data], 3, "cuda", decoder)
    [cpu] = decode_batch([data], 3, "cpu", decoder)
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape == (3, 120, 160)
