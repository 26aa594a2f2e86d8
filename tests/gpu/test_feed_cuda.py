"""The feed on CUDA: pinned host batches, copies on a side stream, the GPU-decode path (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from imagesets import write_jpeg_folder

from barlow.data import open_source
from barlow.data.feed import TrainingFeed
from barlow.spec import DataSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    write_jpeg_folder(root / "train", 48)
    return root


def _views(folder, decode: str, workers: int):
    data = DataSpec(train=str(folder / "train"), image_size=16, decode=decode)
    feed = TrainingFeed(data, torch.device("cuda"))
    src = open_source(data, "train")
    return list(feed(src.loader(transform=feed.transform, batch_size=8, rank=0, world_size=1, seed=3, epoch=0,
                                workers=workers, pin_memory=feed.pin_memory)))


@pytest.mark.parametrize("workers", [0, 2])
def test_cpu_decode_views_on_cuda(folder, workers):
    got = _views(folder, "cpu", workers)
    assert len(got) == 6
    for batch in got:
        x1, x2, n, labels = batch.x1, batch.x2, batch.n_corrupt, batch.labels
        assert x1.is_cuda and labels.is_cuda and x1.shape == x2.shape == (8, 3, 16, 16) and n == 0
        assert x1.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(x1).all()


def test_gpu_decode_matches_cpu_decode_closely(folder):
    """Same seed: the same boxes and flips; the device decoder's pixels differ from PIL's by rounding only."""
    pytest.importorskip("barlow.data.devicedecode")
    cpu, gpu = _views(folder, "cpu", 0), _views(folder, "gpu", 2)
    assert len(cpu) == len(gpu) and all(n == 0 for _, _, n, _ in gpu)
    for (a1, *_), (b1, *_) in zip(cpu, gpu, strict=True):
        assert (a1 - b1).abs().mean() < 0.1  # normalised units; JPEG decoders differ in IDCT and upsampling


def _headers_only(data: bytes) -> bytes:
    """The JPEG up to its first scan: the frame header says baseline (so it goes into nvJPEG's batch), and no decoder
    has pixels to produce. A JPEG merely cut short is no test: nvJPEG may decode a truncated scan without an error."""
    return data[: data.index(b"\xff\xda")]


@pytest.mark.parametrize("corrupt", [_headers_only, lambda data: b"not an image " * 20], ids=["headers-only", "junk"])
def test_gpu_decode_counts_and_refills_a_corrupt_image(tmp_path, corrupt):
    pytest.importorskip("barlow.data.devicedecode")
    from barlow.data.devicedecode import gpu_decodable

    write_jpeg_folder(tmp_path / "train", 24)
    bad = sorted((tmp_path / "train" / "class_1").iterdir())[0]
    broken = corrupt(bad.read_bytes())
    assert gpu_decodable(broken) == (corrupt is _headers_only)
    bad.write_bytes(broken)
    got = _views(tmp_path, "gpu", 0)
    assert sum(n for _, _, n, _ in got) == 1 and all(len(x1) == len(y) == 8 for x1, _, _, y in got)
