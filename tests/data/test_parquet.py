"""Parquet with an image column as Hugging Face `datasets` writes it: counted from footers and the label column,
served a row group at a time with equal steps and exact resume, unreadable rows counted and skipped, one-line
errors naming the columns a file has."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from imagesets import IdTag, ids_of, write_hf_parquet

from barlow.augment import ImageTransform
from barlow.data import open_source, summarize
from barlow.data.parquet import build_index
from barlow.data.tarindex import BadShards
from barlow.spec import DataSpec


def batches(source, **kw):
    args = dict(transform=ImageTransform(IdTag(), 3), batch_size=4, rank=0, world_size=1, seed=3, epoch=0)
    return list(source.loader(**{**args, **kw}))


@pytest.mark.parametrize("labels, want", [(True, "45 images in 2 parquet files, 3 classes"),
                                          (False, "45 images in 2 parquet files, unlabelled")])
def test_parquet_is_counted_and_served_with_exact_resume(tmp_path, labels, want):
    write_hf_parquet(tmp_path / "pq", 45, labels=labels)
    data = DataSpec(format="parquet", train=str(tmp_path / "pq"), shuffle_buffer=6)
    index = build_index(data.train)
    assert [s.samples for s in index.shards] == [7, 7, 7, 2, 7, 7, 7, 1]  # row groups of 7 in files of 23 and 22
    assert summarize(data).text == want
    source = open_source(data, "train", cache=str(tmp_path / "out" / "index.json"), keep=True)
    assert source.describe() == want
    ranks = [batches(source, rank=r, world_size=2, workers=2) for r in (0, 1)]
    assert [len(b) for b in ranks] == [45 // 8] * 2
    assert not set(ids_of(ranks[0])) & set(ids_of(ranks[1]))
    if labels:
        assert all(torch.equal(b.labels, b.inputs[:, 1].long()) for b in ranks[0])
    again = open_source(data, "train", cache=str(tmp_path / "out" / "index.json"))
    for a, b in zip(ranks[1][2:], batches(again, rank=1, world_size=2, start_step=2, workers=2), strict=True):
        assert torch.equal(a.inputs, b.inputs)


def test_a_glob_selects_files_and_an_unreadable_row_is_counted_and_skipped(tmp_path):
    write_hf_parquet(tmp_path / "pq", 24, files=3, corrupt=(0,))
    data = DataSpec(format="parquet", train=str(tmp_path / "pq" / "train-0000[01]-*.parquet"))
    source = open_source(data, "train")
    assert source.num_samples == 16
    got = batches(source, batch_size=16, shuffle=False)
    assert sum(b.n_corrupt for b in got) == 1 and all(len(b.labels) == 16 for b in got)


def test_a_parquet_without_an_image_column_names_its_columns(tmp_path):
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": ["a"], "label": [1]}), tmp_path / "pq" / "x.parquet")
    with pytest.raises(BadShards, match=r"x.parquet: no image column \(struct<bytes, path>\); its columns: text, label"):
        build_index(str(tmp_path / "pq"))
    with pytest.raises(BadShards, match="no .parquet files"):
        build_index(str(tmp_path / "nothing-*.parquet"))
