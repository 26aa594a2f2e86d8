"""The host half of the views (HostCrops: crop box, uint8 crop, flip), the crop-first contract, and the feed that
turns loader batches into device views (run here on the CPU; the CUDA path is in tests/gpu/test_feed_cuda.py)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from imagesets import write_jpeg_folder
from PIL import Image
from torchvision.transforms import v2

from barlow.augment import DeviceViews, HostCrops, ImageTransform, View, ViewsConfig
from barlow.data import open_source
from barlow.data.cropfirst import CropFirstError, Encoded
from barlow.data.decode import CorruptImage, decode_image, decode_pixels, open_image
from barlow.data.feed import DeviceFeed, TrainingFeed, resolve_decode
from barlow.data.source import HostBatch, derive_seed, refill_from
from barlow.spec import DataSpec


def _jpeg(width: int, height: int) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def host_crops(size: int, channels: int = 3, min_scale: float = 0.08, flip_prob: float = 0.5, decode: str = "cpu") -> HostCrops:
    view = View(min_scale=min_scale, flip_prob=flip_prob)
    return HostCrops(ViewsConfig(size, channels, (view, view)), decode=decode)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    write_jpeg_folder(root / "train", 48)
    return root


def test_host_crops_are_the_crop_and_flip_of_the_full_size_image():
    """At full-size decoding, each view is exactly v2's resized crop of the drawn box, flipped when drawn so."""
    data = _jpeg(40, 30)
    crops = host_crops(24, 3, min_scale=0.3, flip_prob=0.5)
    full = v2.functional.pil_to_tensor(decode_image(data, "x.jpg"))
    flips_seen = set()
    for seed in range(8):
        crops.reseed(seed)
        x1, x2 = crops(data, "x.jpg")
        boxes, flips = crops.config.host_draws(seed).one(0, *Image.open(io.BytesIO(data)).size)
        assert crops.last_scale == 1 and x1.dtype == torch.uint8 and x1.shape == (3, 24, 24)
        for x, b, flip in zip((x1, x2), boxes, flips, strict=True):
            want = v2.functional.resized_crop(full, *b, [24, 24],
                                              interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
            assert torch.equal(x, want.flip(-1) if flip else want)
            flips_seen.add(flip)
    assert flips_seen == {True, False}


@pytest.mark.parametrize("width,height,min_scale", [(40, 30, 0.08), (64, 64, 0.3), (300, 20, 0.08), (20, 90, 0.5)])
def test_crop_boxes_follow_random_resized_crop(width, height, min_scale):
    """HostDraws (numpy uniforms) against v2.RandomResizedCrop.make_params (torch RNG): boxes inside the image, and
    the same distribution: means of area fraction, log aspect ratio, centre position and the centre-crop fallback
    rate agree within 5 standard errors (wide images like 300x20 take the fallback often)."""
    n = 4000
    torch.manual_seed(1)
    rrc = v2.RandomResizedCrop(8, scale=(min_scale, 1.0))
    config = ViewsConfig(views=(View(min_scale=min_scale), View(min_scale=min_scale)))
    boxes, _ = config.host_draws(1).batch(range(n // 2), [width] * (n // 2), [height] * (n // 2))
    ours = [tuple(b) for b in boxes.reshape(-1, 4).tolist()]
    theirs = [rrc.make_params([torch.empty(1, height, width)]) for _ in range(n)]
    theirs = [(p["top"], p["left"], p["height"], p["width"]) for p in theirs]
    for top, left, h, w in ours:
        assert 0 <= top and top + h <= height and h >= 1
        assert 0 <= left and left + w <= width and w >= 1

    def stats(boxes):
        return np.array([[h * w / (width * height), math.log(w / h), (top + h / 2) / height, (left + w / 2) / width,
                          top == (height - h) // 2 and left == (width - w) // 2]
                         for top, left, h, w in boxes], dtype=np.float64)

    a, b = stats(ours), stats(theirs)
    se = np.sqrt(a.var(0) / n + b.var(0) / n) + 1e-9
    assert np.all(np.abs(a.mean(0) - b.mean(0)) < 5 * se), (a.mean(0), b.mean(0), se)

    def var_se(x):  # the standard error of a variance estimate, from the fourth central moment
        c = x - x.mean(0)
        return np.sqrt(np.maximum((c ** 4).mean(0) - c.var(0) ** 2, 0) / len(x))

    var_tol = 5 * np.sqrt(var_se(a) ** 2 + var_se(b) ** 2) + 1e-9  # the spreads too, within 5 standard errors
    assert np.all(np.abs(a.var(0) - b.var(0)) < var_tol), (a.var(0), b.var(0), var_tol)


@pytest.mark.parametrize("width,height,channels,min_scale", [(40, 30, 3, 0.08), (24, 24, 3, 1.0), (57, 33, 1, 0.2)])
def test_host_crops_equal_v2_resized_crop_on_many_boxes(width, height, channels, min_scale):
    """The direct uint8 bicubic kernel gives v2.functional.resized_crop's pixels exactly, on 64 boxes per image,
    including boxes already at the output size (24x24 at scale 1: no resize at all) and grayscale."""
    data = _jpeg(width, height)
    crops = host_crops(24, channels, min_scale=min_scale)
    full = v2.functional.pil_to_tensor(decode_image(data, "x.jpg", channels))
    crops.reseed(3)
    draws = crops.config.host_draws(3)
    for i in range(32):
        x1, x2 = crops(data, "x.jpg")
        boxes, flips = draws.one(i, *Image.open(io.BytesIO(data)).size)
        for x, b, flip in zip((x1, x2), boxes, flips, strict=True):
            want = v2.functional.resized_crop(full, *b, [24, 24],
                                              interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
            assert x.shape == (channels, 24, 24) and torch.equal(x, want.flip(-1) if flip else want)


def _encoded(mode: str, fmt: str, **save) -> bytes:
    rng = np.random.default_rng(len(mode) + len(fmt))
    img = Image.fromarray((rng.random((45, 61, 3)) * 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


@pytest.mark.parametrize("mode,fmt,save", [
    ("RGB", "JPEG", {"subsampling": 0}), ("RGB", "JPEG", {"subsampling": 1}), ("RGB", "JPEG", {"subsampling": 2}),
    ("RGB", "JPEG", {"progressive": True}), ("L", "JPEG", {}), ("CMYK", "JPEG", {}),
    ("RGB", "PNG", {}), ("RGBA", "PNG", {}), ("P", "PNG", {}), ("L", "PNG", {})])
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("min_size", [None, (30, 22)])
def test_decode_pixels_equal_decode_image(mode, fmt, save, channels, min_size):
    """decode_pixels (torchvision for full-size RGB/gray JPEGs, PIL otherwise) gives decode_image's pixels exactly."""
    data = _encoded(mode, fmt, **save)
    want = v2.functional.pil_to_tensor(decode_image(data, "x", channels, min_size))
    got = decode_pixels(data, open_image(data, "x"), "x", channels, min_size)
    assert got.dtype == torch.uint8 and got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("cut", [600, 1500])
@pytest.mark.parametrize("channels", [3, 1])
def test_decode_pixels_of_a_truncated_jpeg_is_corrupt(cut, channels):
    data = _encoded("RGB", "JPEG")[:cut]
    with pytest.raises(CorruptImage, match="bad.jpg"):
        decode_image(data, "bad.jpg", channels)  # today's decode says so
    with pytest.raises(CorruptImage, match="bad.jpg"):
        decode_pixels(data, open_image(data, "bad.jpg"), "bad.jpg", channels)


def test_host_crops_decode_large_jpegs_reduced():
    crops = host_crops(16, 3, min_scale=0.9)
    crops.reseed(0)
    x1, x2 = crops(_jpeg(640, 480), "big.jpg")
    assert crops.last_scale == 8 and x1.shape == x2.shape == (3, 16, 16)


def test_gpu_mode_reads_bytes_and_draws_the_boxes_and_flips_of_cpu_mode(folder):
    """decode=gpu: the workers only read bytes and choose boxes; the same seed gives cpu mode's boxes and flips."""
    src = open_source(DataSpec(train=str(folder / "train")), "train")
    kw = dict(batch_size=8, rank=0, world_size=1, seed=7, epoch=1)
    gpu = next(iter(src.loader(transform=host_crops(16, 3, decode="gpu"), **kw)))
    cpu = next(iter(src.loader(transform=host_crops(16, 3, decode="cpu"), **kw)))
    assert isinstance(gpu.inputs, Encoded) and len(gpu.inputs.data) == 8 and gpu.seed == cpu.seed
    assert torch.equal(gpu.labels, cpu.labels)
    first = bytes(gpu.inputs.data[0].numpy())
    assert first[:2] == b"\xff\xd8"  # the JPEG as stored
    draws = host_crops(16, 3).config.host_draws(derive_seed("host", cpu.seed))  # the batch seed drives the draws
    boxes, flips = draws.one(0, *Image.open(io.BytesIO(first)).size)  # replay the first sample's
    for view in (0, 1):
        assert gpu.inputs.boxes[view][0].tolist() == list(boxes[view])
        assert bool(gpu.inputs.flips[view][0]) == flips[view]


def test_an_op_before_the_crop_is_an_error_not_a_silent_full_decode():
    jitter_first = v2.Compose([v2.ToImage(), v2.ColorJitter(0.4), v2.RandomResizedCrop(16), v2.ToDtype(torch.float32)])
    with pytest.raises(CropFirstError, match="ColorJitter before RandomResizedCrop"):
        ImageTransform(jitter_first, 3)
    full = ImageTransform(jitter_first, 3, crop_first=False)  # the documented explicit way: decode at full size
    assert full(_jpeg(40, 30), "x.jpg").shape == (3, 16, 16)
    no_crop = v2.Compose([v2.ToImage(), v2.CenterCrop(8)])  # nothing to move before decoding: plain decode
    assert ImageTransform(no_crop, 3)(_jpeg(40, 30), "x.jpg").shape == (3, 8, 8)


@pytest.mark.parametrize("asked, device, got", [("auto", "cpu", "cpu"), ("cpu", "cpu", "cpu"), ("auto", "cuda", "gpu"),
                                                ("cpu", "cuda", "cpu"), ("gpu", "cuda", "gpu"), ("gpu", "cpu", None)])
def test_resolve_decode(asked, device, got):
    if got is None:
        with pytest.raises(ValueError, match="data.decode: gpu needs a CUDA device"):
            resolve_decode(asked, torch.device(device))
    else:
        assert resolve_decode(asked, torch.device(device)) == got


def _feed(src, data, **kw):
    feed = TrainingFeed(data, torch.device("cpu"))
    args = dict(batch_size=8, rank=0, world_size=1, seed=3, epoch=0, workers=0)
    return list(feed(src.loader(transform=feed.transform, pin_memory=feed.pin_memory, **{**args, **kw})))


def test_feed_yields_normalised_channels_last_views(folder):
    data = DataSpec(train=str(folder / "train"), image_size=16)
    src = open_source(data, "train")
    got = _feed(src, data)
    assert len(got) == src.num_samples // 8
    x1, x2, n = got[0].x1, got[0].x2, got[0].n_corrupt
    assert x1.shape == x2.shape == (8, 3, 16, 16) and x1.dtype == torch.float32 and n == 0
    assert got[0].labels.dtype == torch.long and got[0].labels.shape == (8,)  # the labels ride along (online probe)
    assert x1.is_contiguous(memory_format=torch.channels_last) and not torch.equal(x1, x2)
    assert x1.min() < -1 and x1.max() > 1  # normalised with ImageNet's mean and std, not in [0, 1]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_feed_resume_mid_epoch_gives_the_same_views(folder):
    data = DataSpec(train=str(folder / "train"), image_size=16)
    src = open_source(data, "train")
    full = _feed(src, data, world_size=2, rank=1, workers=2, batch_size=4)
    resumed = _feed(src, data, world_size=2, rank=1, start_step=2, batch_size=4)
    assert len(full) == 6 and len(resumed) == len(full) - 2
    assert all(torch.equal(a.x1, b.x1) and torch.equal(a.x2, b.x2) and torch.equal(a.labels, b.labels)
               for a, b in zip(full[2:], resumed, strict=True))


def test_feed_counts_corrupt_images_and_keeps_batches_full(tmp_path):
    write_jpeg_folder(tmp_path / "train", 24)
    bad = sorted((tmp_path / "train" / "class_1").iterdir())[0]
    bad.write_bytes(b"not a jpeg at all")
    data = DataSpec(train=str(tmp_path / "train"), image_size=16)
    got = _feed(open_source(data, "train"), data, shuffle=False, drop_last=False, batch_size=8)
    assert sum(b.n_corrupt for b in got) == 1 and all(len(b.x1) == len(b.x2) == len(b.labels) for b in got)


def test_feed_holds_at_most_one_batch_ahead(folder):
    data = DataSpec(train=str(folder / "train"), image_size=16)
    src = open_source(data, "train")
    pulled = []

    def counted():
        for b in src.loader(transform=host_crops(16, 3), batch_size=8, rank=0, world_size=1, seed=0, epoch=0):
            pulled.append(b)
            yield b

    feed = DeviceFeed(counted(), torch.device("cpu"), DeviceViews(ViewsConfig(16, 3)))
    for i, _ in enumerate(feed):
        assert len(pulled) <= i + 2
        if i == 2:
            break


def _encoded_batch(batch_id: int, n: int = 4, size: int = 16) -> HostBatch:
    """A gpu-mode batch whose every file is the byte `batch_id`: a fake decoder reads the batch's id from it."""
    return HostBatch(Encoded(torch.full((n,), batch_id, dtype=torch.uint8), [1] * n,
                             torch.tensor([[[0, 0, size, size]] * n] * 2), torch.zeros(2, n, dtype=torch.bool),
                             [f"b{batch_id}-{i}.jpg" for i in range(n)], torch.zeros(0, dtype=torch.long),
                             (torch.empty(0, 3, size, size, dtype=torch.uint8),) * 2),
                     torch.zeros(n, dtype=torch.long), 0, batch_id)


def test_the_device_decode_of_the_next_batch_is_issued_before_this_batch_is_trained():
    """decode=gpu: batch k+1's decode is queued (on the copy stream, on CUDA) before the trainer gets batch k, so it
    overlaps step k instead of running between steps."""
    log = []

    def decoder(datas, boxes, flips, size, channels, device, gpu_ok):
        log.append(f"decode {int(datas[0][0])}")
        return [torch.zeros(len(datas), channels, size, size, dtype=torch.uint8) for _ in range(2)], []

    feed = DeviceFeed([_encoded_batch(k) for k in range(4)], torch.device("cpu"), DeviceViews(ViewsConfig(16, 3)),
                      decoder)
    for k, _ in enumerate(feed):
        log.append(f"train {k}")
    assert log == ["decode 0", "decode 1", "train 0", "decode 2", "train 1", "decode 3", "train 2", "train 3"]


def test_a_corrupt_image_under_on_corrupt_fail_stops_at_its_own_batch():
    """Decoding one batch ahead does not move the error: the batches before the bad one are trained."""
    def decoder(datas, boxes, flips, size, channels, device, gpu_ok):
        bad = [0] if int(datas[0][0]) == 2 else []
        return [torch.zeros(len(datas), channels, size, size, dtype=torch.uint8) for _ in range(2)], bad

    feed = DeviceFeed([_encoded_batch(k) for k in range(4)], torch.device("cpu"), DeviceViews(ViewsConfig(16, 3)),
                      decoder, on_corrupt="fail")
    trained = []
    with pytest.raises(CorruptImage, match=r"^b2-0\.jpg: cannot decode image"):
        for batch in feed:
            trained.append(batch)
    assert len(trained) == 2


@pytest.mark.parametrize("n,bad,want", [
    (4, [], []),
    (4, [1], [0]),
    (5, [0, 3], [1, 2]),
    (4, [0, 1, 2], [3, 3, 3]),  # one readable image refills every slot
    (6, [5, 1, 2, 4], [0, 3, 0, 3]),  # in turn over the readable ones, in `bad`'s order
])
def test_refill_from_takes_the_readable_images_in_turn(n, bad, want):
    assert refill_from(n, bad, [f"img{i}" for i in range(n)]) == want


def test_refill_from_a_batch_with_nothing_readable_names_its_images():
    with pytest.raises(CorruptImage, match="every image of a batch is corrupt \\(a, b, c, ...\\)"):
        refill_from(4, [0, 1, 2, 3], ["a", "b", "c", "d"])


def _mixed_folder(root):
    """Small images the GPU decoder takes (baseline JPEG) and ones it cannot (PNG, progressive, CMYK), one corrupt."""
    rng = np.random.default_rng(5)
    kinds = [("JPEG", "RGB", {}), ("PNG", "RGB", {}), ("JPEG", "RGB", {"progressive": True}), ("JPEG", "CMYK", {}),
             ("JPEG", "L", {})]
    for i in range(20):
        fmt, mode, save = kinds[i % len(kinds)]
        img = Image.fromarray(rng.integers(0, 256, (int(rng.integers(20, 30)), 26, 3), dtype=np.uint8)).convert(mode)
        buf = io.BytesIO()
        img.save(buf, format=fmt, **save)
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"i{i:02d}.{'png' if fmt == 'PNG' else 'jpg'}").write_bytes(buf.getvalue() if i != 7 else b"\xff\xd8junk")
    return root


def test_gpu_mode_decodes_what_the_gpu_cannot_take_in_the_workers(tmp_path):
    """decode=gpu: the loader workers decode PNG, progressive and CMYK images themselves (the header tells), so the
    training thread decodes only what the GPU takes; the device path (here its CPU form) then gives cpu mode's views,
    labels and corrupt count."""
    from barlow.data.devicedecode import decode_views

    data = DataSpec(train=str(_mixed_folder(tmp_path / "train")), image_size=16)
    src = open_source(data, "train")
    kw = dict(batch_size=10, rank=0, world_size=1, seed=2, epoch=0, shuffle=False, drop_last=False)
    enc = [b.inputs for b in src.loader(transform=host_crops(16, decode="gpu"), **kw)]
    host = {e.names[i].rsplit("/", 1)[-1].split(".")[0] for e in enc for i in e.host_index.tolist()}
    assert host == {f"i{i:02d}" for i in range(20) if i % 5 in (1, 2, 3) and i != 7}  # png, progressive, cmyk
    assert all(len(e.data[i]) == 0 for e in enc for i in e.host_index.tolist())  # their bytes are not shipped

    config = ViewsConfig(16, 3)
    cpu = list(DeviceFeed(src.loader(transform=HostCrops(config), **kw), torch.device("cpu"), DeviceViews(config)))
    gpu = list(DeviceFeed(src.loader(transform=HostCrops(config, decode="gpu"), **kw), torch.device("cpu"),
                          DeviceViews(config), decode_views))
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.equal(a.labels, b.labels) and a.n_corrupt == b.n_corrupt
        torch.testing.assert_close(b.x1, a.x1, atol=0.1, rtol=0)  # decoders and resize kernels agree up to rounding
        torch.testing.assert_close(b.x2, a.x2, atol=0.1, rtol=0)
    assert sum(b.n_corrupt for b in gpu) == 1


def test_feed_builds_no_tensor_from_host_data_on_the_device(folder):
    """The feed and the views on the meta device (standing for CUDA): batches, labels and parameters reach it only by
    non-blocking copies, and nothing is built there from Python data."""
    from host_syncs import HostDataOnDevice

    data = DataSpec(train=str(folder / "train"), image_size=16)
    src = open_source(data, "train")
    config = ViewsConfig.from_augment(data.augment, 16, 3)
    batches = list(src.loader(transform=HostCrops(config), batch_size=8, rank=0, world_size=1, seed=1, epoch=0))
    views = DeviceViews(config).to("meta")  # set-up, before the steps
    with HostDataOnDevice() as mode:
        got = list(DeviceFeed(batches, torch.device("meta"), views))
    assert len(got) == len(batches) and all(b.x1.device.type == b.labels.device.type == "meta" for b in got)
    assert mode.found == []


class _CollatedBatches(torch.utils.data.Dataset):
    """Item r: HostCrops' collate of the same images reseeded with r, and whether it was made in shared memory (told
    where it was made, before the loader hands it over)."""

    def __init__(self, files: list[bytes], decode: str):
        self.files, self.crops = files, host_crops(16, 3, decode=decode)

    def __len__(self) -> int:
        return 2

    def __getitem__(self, r: int):
        self.crops.reseed(r)
        batch = self.crops.collate([self.crops(f, f"{i}.jpg") for i, f in enumerate(self.files)])
        return batch, all(t.is_shared() for t in _tensors(batch)[:1])


def _tensors(batch) -> list[torch.Tensor]:
    return [batch.blob, *batch.boxes, *batch.flips] if isinstance(batch, Encoded) else list(batch)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_a_loader_worker_collates_into_shared_memory(decode):
    """In a loader worker the batch is made in shared memory, so handing it to the training process copies nothing
    (a plain tensor is copied into shared memory on the way); in the training process itself, plain memory (gpu's
    bytes: in a buffer of its own, barlow.data.handover, where one is free). Same batches either way."""
    files = [_jpeg(40 + 3 * i, 30 + 2 * i) for i in range(4)]
    ds = _CollatedBatches(files, decode)
    here = [ds[r] for r in range(2)]
    assert [shared for _, shared in here] == [decode == "gpu" and batch.lease is not None for batch, _ in here]
    for r, (batch, made_shared) in enumerate(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)):
        assert made_shared
        assert (batch.lease is not None) if decode == "gpu" else not isinstance(batch, Encoded)
        assert all(torch.equal(a, b) for a, b in zip(_tensors(batch), _tensors(here[r][0]), strict=True))
