"""The nvJPEG rule on CUDA (barlow/data/devicedecode.py): nvJPEG's hardware engine writes a batch's outputs as soon
as it is called, into blocks of the caching allocator that kernels still queued on the stream may read. So: a long
kernel queued to read a tensor, the tensor freed (its block back in the allocator, still to be read), a batched
decode of images that size; the reader must still see what the tensor held. On the training stream, and on a side
stream as the feed decodes (one batch ahead, on its copy stream)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from device_decoders import DECODERS
from PIL import Image

from barlow.data.devicedecode import decode_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

H, W = 768, 1024  # a decoded image is 2.25 MiB: a large-pool block, the same size as the freed tensor's


def _jpeg() -> torch.Tensor:
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([128 + 100 * np.sin(xx / 17), 128 + 100 * np.cos(yy / 13), (xx + yy) * 255 / (W + H)], -1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("stream", ["training", "side"])
def test_a_batched_decode_never_overwrites_memory_a_queued_kernel_still_reads(decoder, stream):
    data = _jpeg()
    decode_batch([data], 3, "cuda", decoder)  # the decoder chosen and warmed: its own buffers exist
    side = torch.cuda.Stream() if stream == "side" else torch.cuda.current_stream()
    with torch.cuda.stream(side):
        for _ in range(3):
            victim = torch.full((3, H, W), 7, dtype=torch.uint8, device="cuda")
            torch.cuda._sleep(300_000_000)  # ~0.15 s of queued GPU time before the read below runs
            total = victim.sum(dtype=torch.int64)  # queued: reads `victim` after the sleep
            del victim  # its block goes back to the allocator now, while the read is still queued
            images = decode_batch([data] * 8, 3, "cuda", decoder)
            assert all(img is not None and img.shape == (3, H, W) for img in images)
            assert total.item() == 7 * 3 * H * W  # sync: the check itself
            assert images[0].float().mean() > 30  # the decode did write
