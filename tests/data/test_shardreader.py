"""The streaming shard loader: equal steps per rank, coverage across ranks, exact resume, subsets, bad data, S3."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter

import pytest
import torch
from imagesets import IdTag, Pid, ids_of, write_jpeg_folder, write_tagged_folder

from barlow import storage
from barlow.augment import ImageTransform
from barlow.data import open_source
from barlow.data.decode import CorruptImage
from barlow.data.shardreader import MissingShard, buffer_order, epoch_plan
from barlow.data.shards import write_shards
from barlow.spec import DataSpec, S3Spec

N = 203  # prime: no batch or world size divides it


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    root = tmp_path_factory.mktemp("tagged")
    images = write_tagged_folder(root / "src", N)
    write_shards(str(root / "src"), str(root / "shards"), shard_size=12 << 10, progress=False)
    return root, images


def source(root, **data):
    spec = DataSpec(format="shards", train=str(root / "shards" / "index.json"), **data)
    return open_source(spec, "train")


def epoch(src, **kw):
    args = dict(transform=ImageTransform(IdTag(), 3), batch_size=8, rank=0, world_size=1, seed=5, epoch=0)
    return list(src.loader(**{**args, **kw}))


def test_index_is_uneven(tagged):
    src = source(tagged[0])
    sizes = [s.samples for s in src.index.shards]
    assert len(sizes) > 5 and len(set(sizes)) > 1 and src.num_samples == N and src.classes == ["c0", "c1", "c2", "c3"]


@pytest.mark.parametrize("world, batch, workers, buffer", [(2, 8, 0, 0), (2, 8, 0, 50), (3, 5, 0, 20), (2, 8, 2, 30),
                                                            (4, 16, 0, 0)])
def test_training_epoch_equal_steps_and_coverage(tagged, world, batch, workers, buffer):
    src = source(tagged[0], shuffle_buffer=buffer)
    steps = N // (batch * world)
    ids = []
    for rank in range(world):
        loader = src.loader(transform=ImageTransform(IdTag(), 3), batch_size=batch, rank=rank, world_size=world, seed=1, epoch=2,
                            workers=workers)
        got = list(loader)
        assert len(loader) == len(got) == steps  # every rank the same number of steps: DDP never waits on one
        assert all(x.shape == (batch, 3) and y.shape == (batch,) and int(c) == 0
                   for x, y, c in ((b.inputs, b.labels, b.n_corrupt) for b in got))
        assert all(torch.equal(x[:, 1].long(), y) for x, y in ((b.inputs, b.labels) for b in got))  # labels travel with their images
        ids += ids_of(got)
    # each sample at most once across ranks; exactly steps*batch*world of them: the epoch's dropped tail is the rest
    assert len(ids) == len(set(ids)) == steps * batch * world


@pytest.fixture(scope="module")
def tagged_even(tmp_path_factory):
    root = tmp_path_factory.mktemp("even")
    write_tagged_folder(root / "src", 200, seed=1)
    write_shards(str(root / "src"), str(root / "shards"), shard_size=12 << 10, progress=False)
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_without_buffer_two_ranks_cover_every_sample_exactly_once(tagged_even, workers):
    """shuffle_buffer 0, global batch dividing N (200 = 10 steps x 2 ranks x 10): every sample exactly once."""
    src = source(tagged_even, shuffle_buffer=0)
    ids = [i for rank in (0, 1) for i in ids_of(epoch(src, batch_size=10, rank=rank, world_size=2, workers=workers))]
    assert sorted(ids) == list(range(200))


def test_without_buffer_the_dropped_tail_is_the_end_of_the_shard_order(tagged):
    """N = 203, global batch 16: the 11 samples not served are the last ones in this epoch's shard order."""
    src = source(tagged[0], shuffle_buffer=0)
    served = [i for rank in (0, 1) for i in ids_of(epoch(src, batch_size=8, rank=rank, world_size=2))]
    everything = ids_of(epoch(src, batch_size=1, rank=0, world_size=1))  # same seed and epoch: same shard order
    assert sorted(served) == sorted(everything[:192]) and len(set(served)) == 192


def test_dropped_tail_changes_between_epochs(tagged):
    src = source(tagged[0], shuffle_buffer=10)
    served = [set(ids_of(epoch(src, batch_size=10, epoch=e))) for e in range(3)]
    missing = [set(range(N)) - s for s in served]
    assert all(len(m) == N % 10 for m in missing) and len({frozenset(m) for m in missing}) > 1


def test_evaluation_every_sample_exactly_once_last_batch_short(tagged):
    src = source(tagged[0])
    ids, sizes = [], []
    for rank in range(3):
        got = epoch(src, batch_size=16, rank=rank, world_size=3, shuffle=False, drop_last=False, workers=0)
        ids += ids_of(got)
        sizes.append([len(y) for y in (b.labels for b in got)])
    assert sorted(ids) == list(range(N))
    assert [sum(s) for s in sizes] == [68, 68, 67] and all(s[-1] < 16 for s in sizes)


def test_same_seed_same_epoch_same_batches_other_epoch_differs(tagged):
    src = source(tagged[0], shuffle_buffer=30)
    a, b, c = (epoch(src, epoch=e) for e in (0, 0, 1))
    assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(a, b, strict=True))  # ids and augmentation draws alike
    assert ids_of(a) != ids_of(c)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers, buffer, k", [(0, 0, 5), (0, 40, 7), (2, 40, 3), (3, 25, 10), (2, 0, 1)])
def test_resume_mid_epoch_serves_exactly_the_rest(tagged, workers, buffer, k):
    src = source(tagged[0], shuffle_buffer=buffer)
    kw = dict(batch_size=8, rank=1, world_size=2, seed=9, epoch=4, workers=workers)
    full = epoch(src, **kw)
    interrupted = list(zip(range(k), src.loader(transform=ImageTransform(IdTag(), 3), **kw), strict=False))  # stopped after k batches
    resumed = epoch(src, start_step=k, **kw)
    assert len(interrupted) == k and len(resumed) == len(full) - k
    # the same batches in the same order, with the same augmentation draws: nothing lost, nothing repeated
    assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(full, [b for _, b in interrupted] + resumed, strict=True))


def test_loader_workers_serve_every_epoch_and_the_same_batches_as_new_workers(tagged):
    """The shard loader's workers start once for a set of loader arguments and plan each epoch themselves: one
    worker process serves three epochs, other arguments start new ones, and with workers every epoch (and a resume
    inside one) serves exactly the batches of a new source's new workers."""
    src = source(tagged[0])
    kw = dict(transform=ImageTransform(Pid(), 3), batch_size=16, rank=0, world_size=1, seed=3, workers=1)
    pids = {int(v) for e in range(3) for b in src.loader(epoch=e, **kw) for v in b.inputs[:, 0]}
    assert len(pids) == 1 and pids != {os.getpid()}
    assert {int(v) for b in src.loader(epoch=0, **{**kw, "batch_size": 8}) for v in b.inputs[:, 0]} != pids

    kw = dict(transform=ImageTransform(IdTag(), 3), batch_size=8, rank=1, world_size=2, seed=3, workers=2)
    when = ((0, 0), (1, 0), (1, 3), (2, 0))
    one = [list(src.loader(epoch=e, start_step=s, **kw)) for e, s in when]
    fresh = [list(source(tagged[0]).loader(epoch=e, start_step=s, **kw)) for e, s in when]  # new workers each
    for a, b in zip(one, fresh, strict=True):
        assert len(a) == len(b) > 0 and all(torch.equal(x.inputs, y.inputs) and torch.equal(x.labels, y.labels)
                                            for x, y in zip(a, b, strict=True))
    assert ids_of(one[0]) != ids_of(one[1])  # epochs differ


def test_resume_at_the_end_of_an_epoch_serves_nothing(tagged):
    src = source(tagged[0])
    steps = N // 8
    assert epoch(src, start_step=steps) == []
    with pytest.raises(ValueError, match="start_step"):
        epoch(src, start_step=steps + 1)


def test_batch_order_independent_of_worker_count_as_a_set(tagged):
    src = source(tagged[0], shuffle_buffer=0)
    one, two = (set(ids_of(epoch(src, batch_size=8, workers=w, shuffle=False))) for w in (0, 2))
    assert one == two and len(one) == N // 8 * 8


@pytest.mark.parametrize("percent", [10, 1])
def test_label_subset_per_class_deterministic(tagged, percent):
    root, images = tagged
    src = source(root)
    per_class = Counter(label for label, _ in images.values())
    expected = {c: max(1, round(n * percent / 100)) for c, n in per_class.items()}
    assert src.count(percent) == sum(expected.values())
    got = epoch(src, batch_size=4, world_size=2, rank=0, shuffle=False, drop_last=False, subset_percent=percent)
    got += epoch(src, batch_size=4, world_size=2, rank=1, shuffle=False, drop_last=False, subset_percent=percent)
    ids = ids_of(got)
    assert Counter(int(y) for labels in (b.labels for b in got) for y in labels) == expected
    train = set(ids_of(epoch(src, batch_size=1, world_size=1, seed=3, subset_percent=percent)))
    assert train == set(ids)  # the same samples whatever the rank split, shuffle or seed
    assert set(ids) < set(ids_of(epoch(src, batch_size=1, subset_percent=10))) or percent == 10
    with pytest.raises(ValueError, match="subset_percent: 50"):
        epoch(src, subset_percent=50)


def test_plan_is_a_partition():
    counts = [7, 0, 13, 5, 21, 2]
    for world, workers in [(1, 1), (2, 3), (3, 2)]:
        covered = []
        for rank in range(world):
            for p in epoch_plan(counts, batch_size=4, rank=rank, world_size=world, workers=workers, seed=0, epoch=1):
                assert p.num_samples == sum(p.batch_sizes)
                covered += [(s.shard, i) for s in p.segments for i in range(s.start, s.stop)]
        assert len(covered) == len(set(covered)) == sum(counts) // (4 * world) * 4 * world


@pytest.mark.parametrize("n, buffer", [(100, 10), (5, 10), (50, 0)])
def test_buffer_order_is_a_bounded_permutation(n, buffer):
    order = buffer_order(n, buffer, seed=3 if buffer else None)
    assert sorted(order) == list(range(n))
    # the k-th sample out was read at most `buffer` samples earlier than the (k+buffer)-th read
    assert all(p <= k + max(buffer, 1) - 1 for k, p in enumerate(order[: n - buffer]))


@pytest.fixture
def with_corrupt(tmp_path):
    images = write_jpeg_folder(tmp_path / "src", 24)
    bad_key = sorted(images)[5]
    cls, name = bad_key.split("/")
    (tmp_path / "src" / cls / f"{name}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    write_shards(str(tmp_path / "src"), str(tmp_path / "shards"), shard_size=12 << 10, progress=False)
    return tmp_path, bad_key


def test_corrupt_image_skipped_counted_batch_kept_full(with_corrupt):
    root, _ = with_corrupt
    src = source(root, on_corrupt="skip")
    got = epoch(src, transform=ImageTransform(lambda img: torch.tensor(img.size), 3), batch_size=6, shuffle=False)
    assert len(got) == 4 and all(len(y) == 6 for y in (b.labels for b in got))
    assert sum(int(b.n_corrupt) for b in got) == 1


def test_corrupt_image_fails_the_run_naming_shard_and_key(with_corrupt):
    root, bad_key = with_corrupt
    src = source(root, on_corrupt="fail")
    with pytest.raises(CorruptImage, match=rf"shard-\d{{6}}\.tar: {bad_key}\.jpg: cannot decode"):
        epoch(src, transform=ImageTransform(lambda img: torch.tensor(img.size), 3), batch_size=6, shuffle=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_missing_shard_is_an_error_naming_it(tmp_path, workers):
    write_jpeg_folder(tmp_path / "src", 30)
    write_shards(str(tmp_path / "src"), str(tmp_path / "shards"), shard_size=12 << 10, progress=False)
    (tmp_path / "shards" / "shard-000002.tar").unlink()
    src = source(tmp_path)
    with pytest.raises(MissingShard, match=r"shard-000002\.tar.*is missing"):
        epoch(src, transform=ImageTransform(lambda img: torch.tensor(img.size), 3), batch_size=2, workers=workers)


def test_shard_shorter_than_its_index_is_an_error(tmp_path):
    import json

    from barlow.data.shardreader import ShardError

    write_jpeg_folder(tmp_path / "src", 12)
    write_shards(str(tmp_path / "src"), str(tmp_path / "shards"), progress=False)
    index_path = tmp_path / "shards" / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][0]["samples"] += 4  # as if the shard had been cut short after the index was written
    index_path.write_text(json.dumps(index))
    src = source(tmp_path)
    with pytest.raises(ShardError, match=r"shard-000000\.tar: has 12 samples, the index .* lists 16"):
        epoch(src, transform=ImageTransform(lambda img: torch.tensor(img.size), 3), batch_size=4, shuffle=False)


def test_missing_index_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing/index.json: no shard index"):
        open_source(DataSpec(format="shards", train=str(tmp_path / "nothing" / "index.json")), "train")


def _jpeg(width: int, height: int) -> bytes:
    from io import BytesIO

    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)  # smooth, photo-like
    buf = BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_crop_first_equals_the_plain_pipeline_at_full_size():
    """Same seed, same crop: crop-first (crop drawn from the header) gives the plain transform's exact pixels."""
    from torchvision.transforms import v2

    from barlow.data.cropfirst import CropFirst
    from barlow.data.decode import decode_image

    view = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(48, antialias=True), v2.ToDtype(torch.float32, scale=True)])
    fast, data = CropFirst.wrap(view, 3), _jpeg(120, 90)
    for seed in range(5):
        torch.manual_seed(seed)
        a = fast(data, "x.jpg")
        torch.manual_seed(seed)
        b = view(decode_image(data, "x.jpg"))
        assert fast.last_scale == 1 and torch.equal(a, b)


def test_two_views_crop_first_draft_decoding(tmp_path):
    """TwoViews through the loader's crop-first path; a JPEG far larger than its crops decodes at 1/8, close
    to what a full-size decode gives."""
    from reference_views import TwoViews, TwoViewsCropFirst
    from torchvision.transforms import v2

    from barlow.data.cropfirst import CropFirst
    from barlow.data.decode import decode_image

    write_jpeg_folder(tmp_path / "src", 8)
    write_shards(str(tmp_path / "src"), str(tmp_path / "shards"), progress=False)
    src = source(tmp_path, image_size=16)
    kw = dict(batch_size=8, rank=0, world_size=1, seed=5, epoch=0)
    (x1, x2) = next(iter(src.loader(transform=TwoViewsCropFirst(TwoViews(16, 3)), **kw))).inputs
    assert x1.shape == x2.shape == (8, 3, 16, 16) and x1.dtype == torch.float32 and not torch.equal(x1, x2)

    assert CropFirst.wrap(TwoViews(16, 3).view1, 3) is not None and CropFirst.wrap(lambda im: im, 3) is None
    view = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(16, scale=(0.9, 1.0), antialias=True),
                       v2.ToDtype(torch.float32, scale=True)])
    fast, data = CropFirst.wrap(view, 3), _jpeg(640, 480)
    torch.manual_seed(0)
    reduced = fast(data, "big.jpg")
    torch.manual_seed(0)
    full = view(decode_image(data, "big.jpg"))
    assert fast.last_scale == 8  # crops >= 0.9 of 640x480 leave 1/8 room for 16 px views
    assert reduced.shape == full.shape == (3, 16, 16) and (reduced - full).abs().mean() < 0.02


# ---- the same loader reading from the real S3 server ----------------------------------------------------------

@pytest.fixture
def tagged_on_s3(tagged, s3):
    root, images = tagged
    fs, _ = storage.filesystem(s3.url)
    fs.put(str(root / "shards"), f"{s3.url}/shards".removeprefix("s3://"), recursive=True)
    spec = DataSpec(format="shards", train=f"{s3.url}/shards/index.json",
                    s3=S3Spec(endpoint_url=s3.server.endpoint_url, retries=12), shuffle_buffer=20)
    return open_source(spec, "train"), s3


@pytest.mark.parametrize("workers", [0, 2])
def test_s3_epoch_matches_local(tagged, tagged_on_s3, workers):
    remote, _ = tagged_on_s3
    local = source(tagged[0], shuffle_buffer=20)
    kw = dict(batch_size=8, rank=0, world_size=2, seed=2, epoch=1, workers=workers)
    a, b = epoch(remote, **kw), epoch(local, **kw)
    assert len(a) == len(b) and all(torch.equal(x.inputs, y.inputs) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_s3_server_stopped_mid_epoch_and_restarted_loses_nothing(tagged_on_s3, caplog):
    remote, s3 = tagged_on_s3
    kw = dict(batch_size=8, rank=0, world_size=1, seed=4, epoch=0)
    expected = ids_of(epoch(remote, **kw))
    got, outage = [], {}

    caplog.set_level(logging.WARNING, logger="barlow.storage")
    for i, batch in enumerate(remote.loader(transform=ImageTransform(IdTag(), 3), **kw)):
        got.append(batch)
        if i == 2:  # a few shards in: the server goes away while the rest are still to be read
            t = threading.Thread(target=s3.server.outage, args=(3, outage))
            t.start()
            time.sleep(0.5)
    t.join()
    assert outage["back"] - outage["stopped"] >= 3
    assert ids_of(got) == expected
    assert any("attempt 1 of" in r.getMessage() for r in caplog.records)  # the reader met the outage and retried
