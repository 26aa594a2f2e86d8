"""The shard writer: byte-exact round trips (local and S3), resumable reruns, no half-written shard in an index."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from imagesets import write_jpeg_folder
from s3server import local_files_contain, s3_files_contain
from typer.testing import CliRunner

from barlow import storage
from barlow.cli import app
from barlow.data.layout import iter_samples, load_index
from barlow.data.shards import list_images, plan_shards, write_shard, write_shards

SMALL = 16 << 10  # 16 KiB shards: a few images each, so every test writes several


def read_back(index_url: str) -> dict[str, tuple[int, bytes, str]]:
    """key -> (label, image bytes, shard name) over every shard the index lists; a key seen twice fails."""
    index = load_index(index_url)
    seen: dict[str, tuple[int, bytes, str]] = {}
    for i, info in enumerate(index.shards):
        with storage.open_read(index.shard_url(i)) as f:
            samples = list(iter_samples(f, info.name))
        assert len(samples) == info.samples
        for s in samples:
            assert s.key not in seen, f"{s.key} in {seen[s.key][2]} and {info.name}"
            assert s.ext == "jpg"
            seen[s.key] = (s.label, s.image, info.name)
    return seen


@pytest.mark.parametrize("where", ["local->local", "local->s3", "s3->s3"])
def test_round_trip_every_image_once_bytes_equal(where, tmp_path, request):
    images = write_jpeg_folder(tmp_path / "src", 40)
    src, dst = str(tmp_path / "src"), str(tmp_path / "shards")
    if "s3" in where:
        s3 = request.getfixturevalue("s3")
        dst = f"{s3.url}/shards"
        if where.startswith("s3"):
            fs, _ = storage.filesystem(s3.url)
            fs.put(src, f"{s3.url}/src".removeprefix("s3://"), recursive=True)
            src = f"{s3.url}/src"
    done = write_shards(src, dst, shard_size=SMALL, workers=3, progress=False)
    assert done["shards"] > 2 and done["written"] == done["shards"] and done["samples"] == 40

    back = read_back(storage.join(dst, "index.json"))
    assert set(back) == set(images)
    assert all(back[k][:2] == images[k] for k in images)
    index = load_index(storage.join(dst, "index.json"))
    assert index.classes == ["class_0", "class_1", "class_2"] and index.class_counts == [14, 13, 13]
    assert json.loads(storage.read_text(storage.join(dst, "index.json")))["num_samples"] == 40


def test_shards_are_plain_webdataset_tars(tmp_path):
    write_jpeg_folder(tmp_path / "src", 6)
    write_shards(str(tmp_path / "src"), str(tmp_path / "out"), shard_size=1 << 20, progress=False)
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        names = tar.getnames()
        first = tar.getmember(names[0])
    assert len(names) == 12
    assert [n.rsplit(".", 1)[1] for n in names] == ["jpg", "cls"] * 6
    assert all(a.rsplit(".", 1)[0] == b.rsplit(".", 1)[0] for a, b in zip(names[::2], names[1::2], strict=True))
    assert first.mtime == 0 and first.uname == ""  # reproducible: nothing of the writing machine


def test_rerun_skips_complete_shards_and_rewrites_missing(tmp_path):
    write_jpeg_folder(tmp_path / "src", 30)
    src, dst = str(tmp_path / "src"), tmp_path / "out"
    first = write_shards(src, str(dst), shard_size=SMALL, progress=False)
    index_bytes = (dst / "index.json").read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in dst.glob("shard-*.tar")}

    again = write_shards(src, str(dst), shard_size=SMALL, progress=False)
    assert again["written"] == 0 and again["skipped"] == first["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in dst.glob("shard-*.tar")} == stamps

    (dst / "shard-000001.tar").unlink()
    healed = write_shards(src, str(dst), shard_size=SMALL, progress=False)
    assert healed["written"] == 1
    assert (dst / "index.json").read_bytes() == index_bytes
    assert {p.name for p in dst.iterdir()} == set(stamps) | {"index.json"}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_failed_shard_never_appears(where, tmp_path, request):
    write_jpeg_folder(tmp_path / "src", 20)
    src = str(tmp_path / "src")
    dst = f"{request.getfixturevalue('s3').url}/out" if where == "s3" else str(tmp_path / "out")
    classes, images = list_images(src)
    plan = plan_shards(images, SMALL, seed=0)
    victim = plan[0].images[-1]  # the shard's last image vanishes after planning: the write fails midway
    saved = Path(victim.path).read_bytes()
    Path(victim.path).unlink()
    with pytest.raises(FileNotFoundError):
        write_shard(src, dst, plan[0])
    assert storage.list_names(dst) == []  # neither the shard nor a temporary under any name

    Path(victim.path).write_bytes(saved)
    done = write_shards(src, dst, shard_size=SMALL, progress=False)
    assert done["written"] == len(plan) and len(read_back(storage.join(dst, "index.json"))) == 20


@pytest.mark.slow
def test_killed_writer_leaves_no_index_and_rerun_completes(tmp_path):
    write_jpeg_folder(tmp_path / "src", 300)
    src, dst = str(tmp_path / "src"), tmp_path / "out"
    code = (f"from barlow.data.shards import write_shards; "
            f"write_shards({src!r}, {str(dst)!r}, shard_size={SMALL}, workers=1, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while len(list(dst.glob("shard-*.tar"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (dst / "index.json").exists(), "the writer finished before it could be killed: make the set bigger"
    planned = {s.name: s.bytes for s in plan_shards(list_images(src)[1], SMALL, seed=0)}
    done_before = {p.name: p.stat().st_size for p in dst.glob("shard-*.tar")}
    assert done_before and all(planned[n] == size for n, size in done_before.items())  # only complete shards there

    again = write_shards(src, str(dst), shard_size=SMALL, progress=False)
    assert again["skipped"] >= len(done_before) and again["written"] == len(planned) - again["skipped"]
    assert sorted(p.name for p in dst.iterdir()) == sorted([*planned, "index.json"])  # temporaries cleaned
    assert len(read_back(str(dst / "index.json"))) == 300


@pytest.mark.parametrize("where", ["local", "s3"])
def test_no_credentials_in_written_files(where, tmp_path, request):
    s3 = request.getfixturevalue("s3")  # credentials are in the environment in both cases
    write_jpeg_folder(tmp_path / "src", 12)
    dst = f"{s3.url}/out" if where == "s3" else str(tmp_path / "out")
    write_shards(str(tmp_path / "src"), dst, shard_size=SMALL, progress=False)
    needles = [s3.access_key.encode(), s3.secret_key.encode()]
    found = s3_files_contain(s3.server, dst, needles) if where == "s3" else local_files_contain(dst, needles)
    assert found == []
    assert len(storage.list_names(dst)) > 2  # the scan saw the shards and the index


@pytest.mark.parametrize("setup, message", [
    (lambda root: root.mkdir(), "no images"),
    (lambda root: [(root / "a").mkdir(parents=True), (root / "a" / "x.jpg").write_bytes(b"1"),
                   (root / "a" / "x.png").write_bytes(b"2")], "would share the sample key a/x"),
])
def test_bad_source_is_one_clear_error(setup, message, tmp_path):
    setup(tmp_path / "src")
    with pytest.raises((FileNotFoundError, ValueError), match="src.*" + message.replace("<", ".").replace(">", ".")):
        write_shards(str(tmp_path / "src"), str(tmp_path / "out"), progress=False)


def test_cli_shard_command(tmp_path):
    write_jpeg_folder(tmp_path / "src", 9)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "shard", str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size-mb", "1",
                                 "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "9 images, 3 classes, 1 shards (1 written" in " ".join(result.output.split())
    bad = runner.invoke(app, ["data", "shard", str(tmp_path / "nothing"), str(tmp_path / "out2")])
    assert bad.exit_code == 1 and "no such image folder" in " ".join(bad.output.split())
