"""The image-folder source: equal steps on every rank, disjoint samples, exact mid-epoch resume, corrupt files."""

from __future__ import annotations

import pytest
import torch

from barlow.data import open_source
from barlow.data.decode import CorruptImage
from barlow.data.demo import write_demo
from barlow.spec import DataSpec


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
    args = dict(transform=Tag(), batch_size=16, rank=0, world_size=1, seed=3, epoch=0)
    return list(source.loader(**{**args, **kw}))


@pytest.mark.parametrize("world_size, batch", [(1, 64), (2, 32), (3, 16)])
def test_every_rank_gets_the_same_number_of_full_batches(folder, world_size, batch):
    source = open_source(DataSpec(train=str(folder / "train")), "train")
    expected = source.num_samples // (world_size * batch)
    for rank in range(world_size):
        got = batches(source, batch_size=batch, rank=rank, world_size=world_size)
        assert len(got) == expected and all(len(labels) == batch for _, labels, _ in got)


def test_ranks_see_disjoint_samples_and_epochs_reshuffle(folder):
    source = open_source(DataSpec(train=str(folder / "train")), "train")
    orders = {}
    for epoch in (0, 1):
        ranks = [batches(source, rank=r, world_size=2, epoch=epoch) for r in (0, 1)]
        seen = [torch.cat([x[:, 1] for x, _, _ in b]).tolist() for b in ranks]
        assert not set(seen[0]) & set(seen[1])
        orders[epoch] = torch.cat([labels for _, labels, _ in ranks[0]]).tolist()
    assert orders[0] != orders[1]


def test_resume_mid_epoch_serves_the_same_remaining_batches(folder):
    source = open_source(DataSpec(train=str(folder / "train")), "train")
    full = batches(source, rank=1, world_size=2, workers=2)
    resumed = batches(source, rank=1, world_size=2, start_step=5, workers=0)
    assert len(resumed) == len(full) - 5
    for (a, la, _), (b, lb, _) in zip(full[5:], resumed, strict=True):
        assert torch.equal(la, lb) and torch.equal(a, b)  # same samples and the same augmentation draws


def test_eval_order_covers_every_sample_once(folder):
    source = open_source(DataSpec(train=str(folder / "train"), val=str(folder / "val")), "val")
    counts = [sum(len(y) for _, y, _ in batches(source, rank=r, world_size=3, shuffle=False, drop_last=False)) for r in range(3)]
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
        assert sum(int(n) for _, _, n in got) == 1
        assert sum(len(y) for _, y, _ in got) == source.num_samples


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: no such image folder"):
        open_source(DataSpec(train=str(tmp_path / "nope")), "train")
