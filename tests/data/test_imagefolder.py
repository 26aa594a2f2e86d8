"""The image-folder source: equal steps on every rank, disjoint samples, exact mid-epoch resume, corrupt files,
the label subsets of the shard format, and a folder on the real S3 server surviving outages and throttling."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import torch
from imagesets import IdTag, Pid, ids_of, write_tagged_folder
from s3server import SlowDownProxy

from barlow import storage
from barlow.augment import ImageTransform
from barlow.data import open_source
from barlow.data.decode import CorruptImage
from barlow.data.demo import write_demo
from barlow.data.shards import write_shards
from barlow.data.source import Source
from barlow.spec import DataSpec, S3Spec


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_demo(str(root), size=8)
    return root


class Tag:
    """A transform returning a pixel and a random draw: the draw is seeded per sample, so it identifies both."""

    def __call__(self, img):
        return torch.tensor([float(img.getpixel((0, 0))[0]), torch.rand(()).item()])


def batches(source, **kw):
    args = dict(transform=ImageTransform(Tag(), 3), batch_size=16, rank=0, world_size=1, seed=3, epoch=0)
    return list(source.loader(**{**args, **kw}))


@pytest.mark.parametrize("world_size, batch", [(1, 64), (2, 32), (3, 16)])
def test_every_rank_gets_the_same_number_of_full_batches(folder, world_size, batch):
    source = open_source(DataSpec(train=str(folder / "train")), "train")
    expected = source.num_samples // (world_size * batch)
    for rank in range(world_size):
        got = batches(source, batch_size=batch, rank=rank, world_size=world_size)
        assert len(got) == expected and all(len(labels) == batch for labels in (b.labels for b in got))


def test_ranks_see_disjoint_samples_and_epochs_reshuffle(tmp_path):
    write_tagged_folder(tmp_path / "src", 200)  # every image carries its sample id
    source = open_source(DataSpec(train=str(tmp_path / "src")), "train")
    orders = {}
    for epoch in (0, 1):
        ranks = [batches(source, transform=ImageTransform(IdTag(), 3), rank=r, world_size=2, epoch=epoch) for r in (0, 1)]
        seen = [ids_of(b) for b in ranks]
        assert not set(seen[0]) & set(seen[1]) and len(set(seen[0])) == len(seen[0]) == 200 // 32 * 16
        orders[epoch] = seen[0]
    assert orders[0] != orders[1]


def test_resume_mid_epoch_serves_the_same_remaining_batches(folder):
    source = open_source(DataSpec(train=str(folder / "train")), "train")
    full = batches(source, rank=1, world_size=2, workers=2)
    resumed = batches(source, rank=1, world_size=2, start_step=5, workers=0)
    assert len(resumed) == len(full) - 5
    for a, b in zip(full[5:], resumed, strict=True):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.inputs, b.inputs)  # same samples and the same augmentation draws


def test_eval_order_covers_every_sample_once(folder):
    source = open_source(DataSpec(train=str(folder / "train"), val=str(folder / "val")), "val")
    counts = [sum(len(b.labels) for b in batches(source, rank=r, world_size=3, shuffle=False, drop_last=False)) for r in range(3)]
    assert sum(counts) == source.num_samples


@pytest.mark.parametrize("percent", [10, 1])
def test_label_subsets_are_per_class_and_deterministic(folder, percent):
    source = open_source(DataSpec(train=str(folder / "train")), "train")
    chosen = source.subset(percent)
    assert chosen == source.subset(percent)
    labels = [source.files[i][1] for i in chosen]
    for c in range(len(source.classes)):
        in_class = sum(1 for _, y in source.files if y == c)
        assert labels.count(c) == max(1, round(in_class * percent / 100))


@pytest.mark.parametrize("on_corrupt", ["skip", "fail"])
def test_corrupt_images(tmp_path, on_corrupt):
    write_demo(str(tmp_path), size=8)
    bad = sorted((tmp_path / "train" / "3").iterdir())[0]
    bad.write_bytes(b"not a jpeg at all")
    source = open_source(DataSpec(train=str(tmp_path / "train"), on_corrupt=on_corrupt), "train")
    run = lambda: batches(source, shuffle=False, drop_last=False, batch_size=512)  # noqa: E731
    if on_corrupt == "fail":
        with pytest.raises(CorruptImage, match=bad.name):
            run()
    else:
        got = run()
        assert sum(int(b.n_corrupt) for b in got) == 1
        assert sum(len(y) for y in (b.labels for b in got)) == source.num_samples


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: no such image folder"):
        open_source(DataSpec(train=str(tmp_path / "nope")), "train")


@pytest.mark.parametrize("percent", [10, 1])
def test_label_subsets_select_the_same_images_as_the_shards(tmp_path, percent):
    """eval.train_percent picks the same images whatever data.format (the key-hash rule of the shard index)."""
    write_tagged_folder(tmp_path / "src", 150)
    write_shards(str(tmp_path / "src"), str(tmp_path / "shards"), shard_size=12 << 10, progress=False)
    kw = dict(transform=ImageTransform(IdTag(), 3), batch_size=4, rank=0, world_size=1, seed=0, epoch=0, shuffle=False, drop_last=False,
              subset_percent=percent)
    folder = open_source(DataSpec(train=str(tmp_path / "src")), "train")
    shards = open_source(DataSpec(format="shards", train=str(tmp_path / "shards" / "index.json")), "train")
    assert isinstance(folder, Source) and isinstance(shards, Source)  # one contract, two implementations
    from_folder, from_shards = ids_of(folder.loader(**kw)), ids_of(shards.loader(**kw))
    assert sorted(from_folder) == sorted(from_shards) and len(from_folder) == folder.count(percent) == shards.count(percent)


def test_batches_carry_their_augmentation_seed(folder):
    source = open_source(DataSpec(train=str(folder / "train")), "train")
    a = list(source.loader(transform=ImageTransform(Tag(), 3), batch_size=16, rank=0, world_size=2, seed=3, epoch=0))
    b = list(source.loader(transform=ImageTransform(Tag(), 3), batch_size=16, rank=0, world_size=2, seed=3, epoch=0, start_step=2))
    assert [x.seed for x in a[2:]] == [x.seed for x in b] and len({x.seed for x in a}) == len(a)


# ---- an image folder on the real S3 server, read by loader worker processes -------------------------------------

@pytest.fixture
def tagged_folder_on_s3(tmp_path, s3):
    images = write_tagged_folder(tmp_path / "src", 48)
    fs, _ = storage.filesystem(s3.url)
    fs.put(str(tmp_path / "src"), f"{s3.url}/folder".removeprefix("s3://"), recursive=True)
    return images, s3


def _folder_spec(url: str, endpoint: str) -> DataSpec:
    return DataSpec(train=url, s3=S3Spec(endpoint_url=endpoint, retries=12), workers=2)


def test_s3_folder_with_workers_matches_local(tmp_path, tagged_folder_on_s3):
    """Loader worker processes on an s3:// folder (each with its own client: an s3fs object is not fork-safe)."""
    _, s3 = tagged_folder_on_s3
    storage.configure_s3()  # no process default pointing at the server: the source passes data.s3 explicitly
    remote = open_source(_folder_spec(f"{s3.url}/folder", s3.server.endpoint_url), "train")
    local = open_source(DataSpec(train=str(tmp_path / "src")), "train")
    kw = dict(transform=ImageTransform(IdTag(), 3), batch_size=8, rank=0, world_size=1, seed=1, epoch=0)
    a, b = list(remote.loader(workers=2, **kw)), list(local.loader(workers=0, **kw))
    assert len(a) == 6 and all(torch.equal(x.inputs, y.inputs) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_s3_folder_survives_the_server_stopping_mid_epoch(tagged_folder_on_s3, caplog):
    images, s3 = tagged_folder_on_s3
    source = open_source(_folder_spec(f"{s3.url}/folder", s3.server.endpoint_url), "train")
    kw = dict(transform=ImageTransform(IdTag(), 3), batch_size=8, rank=0, world_size=1, seed=4, epoch=0, workers=2)
    expected = ids_of(source.loader(**kw))
    got, outage = [], {}

    caplog.set_level(logging.WARNING, logger="barlow.storage")
    t = threading.Thread(target=s3.server.outage, args=(4, outage))
    for i, batch in enumerate(source.loader(**kw)):
        got.append(batch)
        if i == 1:  # the workers have batches still to read when the server goes away
            t.start()
            time.sleep(0.5)
    t.join()
    assert outage["back"] - outage["stopped"] >= 4
    assert ids_of(got) == expected and len(expected) == len(images) // 8 * 8
    assert sum(b.n_corrupt for b in got) == 0  # an unreachable file is retried, never counted as corrupt


@pytest.mark.slow
def test_s3_folder_behind_a_throttling_proxy_serves_every_image(tagged_folder_on_s3):
    images, s3 = tagged_folder_on_s3
    local = ids_of(open_source(_folder_spec(f"{s3.url}/folder", s3.server.endpoint_url), "train").loader(
        transform=ImageTransform(IdTag(), 3), batch_size=8, rank=0, world_size=1, seed=2, epoch=0, shuffle=False, drop_last=False))
    port = int(s3.server.endpoint_url.rsplit(":", 1)[1])
    with SlowDownProxy(port, fail=10) as proxy:
        source = open_source(_folder_spec(f"{s3.url}/folder", proxy.url), "train")  # the listing is throttled too
        got = list(source.loader(transform=ImageTransform(IdTag(), 3), batch_size=8, rank=0, world_size=1, seed=2, epoch=0, workers=2,
                                 shuffle=False, drop_last=False))
        assert proxy.throttled == 10 and proxy.passed >= len(images)
    assert ids_of(got) == local and sorted(local) == list(range(len(images)))
    assert sum(b.n_corrupt for b in got) == 0  # a throttled read is retried, never dropped as corrupt


def test_the_spec_accepts_exactly_the_registered_formats():
    from barlow.augment import HostCrops, ViewsConfig
    from barlow.data import formats
    from barlow.data.source import SampleTransform
    from barlow.spec import DATA_FORMATS

    registered = formats()
    assert sorted(registered) == sorted(DATA_FORMATS)
    assert all(callable(getattr(cls, m, None)) for cls in registered.values() for m in ("count", "loader", "describe"))
    assert isinstance(HostCrops(ViewsConfig(16)), SampleTransform) and isinstance(ImageTransform(Tag(), 3), SampleTransform)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_loader_workers_serve_every_epoch_and_the_same_batches_as_a_fresh_source(folder):
    spec = DataSpec(train=str(folder / "train"))
    source = open_source(spec, "train")
    pid = ImageTransform(Pid(), 3)
    kw = dict(transform=pid, batch_size=64, rank=0, world_size=1, seed=3, workers=1)
    epochs = [list(source.loader(epoch=e, **kw)) for e in range(3)]
    pids = {int(v) for batches in epochs for b in batches for v in b.inputs[:, 0]}
    assert len(pids) == 1 and pids != {os.getpid()}  # one worker process, started once for three epochs
    other = list(source.loader(epoch=0, **{**kw, "batch_size": 32}))  # other arguments: new workers
    assert {int(v) for b in other for v in b.inputs[:, 0]} != pids

    tag = ImageTransform(Tag(), 3)
    kw = dict(transform=tag, batch_size=16, rank=1, world_size=2, seed=3, workers=2)
    one = [list(source.loader(epoch=e, start_step=s, **kw)) for e, s in ((0, 0), (1, 0), (1, 3), (2, 0))]
    fresh = [list(open_source(spec, "train").loader(epoch=e, start_step=s, **{**kw, "workers": 0}))
             for e, s in ((0, 0), (1, 0), (1, 3), (2, 0))]
    for a, b in zip(one, fresh, strict=True):
        assert len(a) == len(b) and all(torch.equal(x.inputs, y.inputs) and torch.equal(x.labels, y.labels)
                                        for x, y in zip(a, b, strict=True))
    assert not torch.equal(one[0][0].inputs, one[1][0].inputs)  # epochs differ
