"""Image folders of any layout: the labels rule (class layout only, or data.labels), unlabelled sources served with
equal steps and exact resume, the listing kept so a restart (and the other ranks) do not list again, one-line errors
for a folder without images, and the count `barlow plan` gives."""

from __future__ import annotations

import json

import pytest
import torch
from imagesets import IdTag, ids_of, write_tagged_folder, write_unlabelled_folder

from barlow import storage
from barlow.augment import ImageTransform
from barlow.data import open_source, summarize
from barlow.data.listing import INDEX_NAME, NoImages, labelled_images, list_folder
from barlow.spec import DataSpec, S3Spec


def touch(root, *rels):
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")


@pytest.mark.parametrize("files, labels, layout, classes", [
    (["a/1.jpg", "a/2.jpg", "b/3.png"], "auto", "class folders", ["a", "b"]),
    (["a/1.jpg", "a/2.jpg"], "auto", "nested folders", []),  # one folder is not a class layout
    (["1.jpg", "2.jpeg", "x.png"], "auto", "flat folder", []),
    (["2024/05/01/1.jpg", "2024/05/02/2.jpg", "2024/06/3.jpg"], "auto", "nested folders", []),
    (["a/1.jpg", "b/2.jpg", "b/deeper/3.jpg"], "auto", "nested folders", []),  # one image two folders down: not
    (["2024/05/1.jpg", "2025/01/2.jpg"], "folders", "nested folders", ["2024", "2025"]),
    (["a/1.jpg", "b/2.jpg"], "none", "class folders", []),
])
def test_labels_come_from_folders_only_in_the_class_layout(tmp_path, files, labels, layout, classes):
    touch(tmp_path, *files, "notes.txt")
    listing = list_folder(str(tmp_path))
    assert listing.layout() == layout
    got_classes, images = labelled_images(listing, labels)
    assert got_classes == classes and len(images) == len(files)
    assert all((img.label >= 0) == bool(classes) for img in images)


def test_folders_label_refuses_an_image_outside_any_folder(tmp_path):
    touch(tmp_path, "a/1.jpg", "2.jpg")
    with pytest.raises(ValueError, match=r"data.labels: folders needs every image in a class folder; .*/2.jpg is not"):
        labelled_images(list_folder(str(tmp_path)), "folders")


def test_a_folder_without_images_names_what_it_holds(tmp_path):
    touch(tmp_path, "a.txt", "b.txt", "c.csv", "d/e.json")
    with pytest.raises(NoImages, match=r"no images .* at any depth; found 2 .txt, 1 .csv, 1 .json"):
        list_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere: no such image folder"):
        list_folder(str(tmp_path / "nowhere"))


def batches(source, **kw):
    args = dict(transform=ImageTransform(IdTag(), 3), batch_size=8, rank=0, world_size=1, seed=3, epoch=0)
    return list(source.loader(**{**args, **kw}))


@pytest.mark.parametrize("layout", ["flat", "dated"])
def test_unlabelled_folder_serves_equal_steps_and_resumes_exactly(tmp_path, layout):
    write_unlabelled_folder(tmp_path, 90, layout)
    source = open_source(DataSpec(train=str(tmp_path)), "train")
    assert source.classes == [] and source.num_samples == 90
    ranks = [batches(source, rank=r, world_size=2) for r in (0, 1)]
    assert [len(b) for b in ranks] == [90 // 16] * 2
    assert not set(ids_of(ranks[0])) & set(ids_of(ranks[1]))
    assert all(torch.equal(b.labels, torch.full((8,), -1)) for b in ranks[0])
    resumed = batches(source, rank=1, world_size=2, start_step=3, workers=2)
    for a, b in zip(ranks[1][3:], resumed, strict=True):
        assert torch.equal(a.inputs, b.inputs)  # the same images and the same augmentation draws
    assert len(source.subset(10)) == 9  # unlabelled images form one group of the label subsets


def test_the_kept_listing_is_read_instead_of_listing_again(tmp_path):
    write_unlabelled_folder(tmp_path / "photos", 20, "dated")
    cache = str(tmp_path / "out" / "data" / "listing-train.json")
    first = open_source(DataSpec(train=str(tmp_path / "photos")), "train", cache=cache, keep=True)
    assert json.loads(open(cache).read())["url"] == str(tmp_path / "photos")
    (tmp_path / "photos" / "2024" / "new.png").write_bytes((tmp_path / "photos" / "2024" / "cam0" / "img0000.png").read_bytes())
    again = open_source(DataSpec(train=str(tmp_path / "photos")), "train", cache=cache)
    assert again.files == first.files  # a restart serves what the first start listed: its resume stays exact
    assert open_source(DataSpec(train=str(tmp_path / "photos")), "train").num_samples == 21  # without it: listed


def test_an_index_written_ahead_on_s3_is_read_by_every_open(s3, tmp_path):
    from typer.testing import CliRunner

    from barlow.cli import app

    write_unlabelled_folder(tmp_path / "photos", 12, "flat")
    fs, _ = storage.filesystem(s3.url, s3.settings)
    fs.put(str(tmp_path / "photos"), s3.url + "/photos", recursive=True)
    result = CliRunner().invoke(app, ["data", "index", f"{s3.url}/photos", "--endpoint-url", s3.server.endpoint_url])
    assert result.exit_code == 0, result.output
    assert "12 images, unlabelled (flat folder)" in " ".join(result.output.split())
    storage.remove(f"{s3.url}/photos/img0003.png", s3.settings)
    data = DataSpec(train=f"{s3.url}/photos", s3=S3Spec(endpoint_url=s3.server.endpoint_url))
    source = open_source(data, "train")
    assert source.num_samples == 12 and any(p.endswith("img0003.png") for p, _ in source.files)  # the index's view
    assert summarize(data).text == "12 images, unlabelled (flat folder)"
    assert storage.exists(f"{s3.url}/photos/{INDEX_NAME}", s3.settings)


@pytest.mark.parametrize("labels, want", [("auto", "40 images, 4 classes (class folders)"),
                                           ("none", "40 images, unlabelled (class folders)")])
def test_summary_says_what_the_data_is(tmp_path, labels, want):
    write_tagged_folder(tmp_path, 40)
    assert summarize(DataSpec(train=str(tmp_path), labels=labels)).text == want
