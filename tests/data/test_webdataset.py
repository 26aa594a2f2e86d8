"""WebDataset tar shards as other tools write them: brace patterns, counting from the headers alone, labels from
.cls or .json or none, the same equal steps and exact resume as barlow's shards, and one-line errors."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from imagesets import IdTag, ids_of, write_wds

from barlow.augment import ImageTransform
from barlow.data import open_source, summarize
from barlow.data.tarindex import BadShards, build_index, expand_braces, scan_shard
from barlow.spec import DataSpec


@pytest.mark.parametrize("pattern, want", [
    ("a-{0..2}.tar", ["a-0.tar", "a-1.tar", "a-2.tar"]),
    ("s-{000008..000010}.tar", ["s-000008.tar", "s-000009.tar", "s-000010.tar"]),
    ("{a,b}-{1..2}.tar", ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]),
    ("plain.tar", ["plain.tar"]),
])
def test_brace_patterns_expand_as_webdataset_does(pattern, want):
    assert expand_braces(pattern) == want


@pytest.mark.parametrize("label, classes", [("cls", ["0", "1", "2"]), ("json", ["0", "1", "2"]), ("none", [])])
def test_samples_are_counted_from_the_headers(tmp_path, label, classes):
    want = write_wds(tmp_path, 30, 3, label)
    index = build_index(str(tmp_path / "shard-{000000..000002}.tar"))
    assert index.classes == classes and index.num_samples == 30 and [s.samples for s in index.shards] == [10, 10, 10]
    scanned = dict(scan_shard(str(tmp_path / "shard-000001.tar")))
    assert scanned == {k: v for k, v in want.items() if k in scanned} and len(scanned) == 10
    assert build_index(str(tmp_path)).num_samples == 30  # a folder of .tar: the same set


def batches(source, **kw):
    args = dict(transform=ImageTransform(IdTag(), 3), batch_size=4, rank=0, world_size=1, seed=3, epoch=0)
    return list(source.loader(**{**args, **kw}))


@pytest.mark.parametrize("label", ["cls", "none"])
def test_webdataset_source_serves_equal_steps_and_resumes_exactly(tmp_path, label):
    want = write_wds(tmp_path, 50, 4, label)
    data = DataSpec(format="webdataset", train=str(tmp_path / "shard-{000000..000003}.tar"), shuffle_buffer=8)
    cache = str(tmp_path / "out" / "index.json")
    source = open_source(data, "train", cache=cache, keep=True)
    assert source.num_samples == 50
    ranks = [batches(source, rank=r, world_size=2, workers=2) for r in (0, 1)]
    assert [len(b) for b in ranks] == [50 // 8] * 2
    assert not set(ids_of(ranks[0])) & set(ids_of(ranks[1]))
    if label == "cls":  # each label is its image's class (the blue channel of pixel (0, 0))
        assert all(torch.equal(b.labels, b.inputs[:, 1].long()) for b in ranks[0])
    else:
        assert all(torch.equal(b.labels, torch.full((4,), -1)) for b in ranks[0])
    again = open_source(data, "train", cache=cache)  # a restart reads the kept index
    resumed = batches(again, rank=1, world_size=2, start_step=2, workers=2)
    for a, b in zip(ranks[1][2:], resumed, strict=True):
        assert torch.equal(a.inputs, b.inputs)
    assert len(want) == 50


def test_summary_of_webdataset_shards(tmp_path):
    write_wds(tmp_path, 20, 2)
    data = DataSpec(format="webdataset", train=str(tmp_path / "shard-{000000..000001}.tar"))
    assert summarize(data).text == "20 images in 2 WebDataset shards, 3 classes"


def test_bad_webdataset_input_is_one_line(tmp_path):
    write_wds(tmp_path, 6, 2)
    with pytest.raises(BadShards, match=r"shard-\{000005..000009\}.tar matches none of the"):
        build_index(str(tmp_path / "shard-{000005..000009}.tar"))
    with tarfile.open(tmp_path / "texts" / "t.tar" if (tmp_path / "texts").mkdir() is None else None, "w") as tar:
        for name in ("a.txt", "b.json"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(BadShards, match=r"t.tar: a tar without images .*; it holds 1 .txt, 1 .json"):
        build_index(str(tmp_path / "texts"))


def test_an_index_written_ahead_is_read_instead_of_counting(tmp_path):
    from typer.testing import CliRunner

    from barlow.cli import app

    write_wds(tmp_path, 12, 2)
    pattern = str(tmp_path / "shard-{000000..000001}.tar")
    result = CliRunner().invoke(app, ["data", "index", pattern, "--format", "webdataset"])
    assert result.exit_code == 0, result.output
    assert "12 images, 3 classes" in " ".join(result.output.split()) and (tmp_path / "barlow-index.json").exists()
    (tmp_path / "shard-000001.tar").unlink()  # a count would fail now: the kept index is what is read
    assert summarize(DataSpec(format="webdataset", train=pattern)).images == 12
