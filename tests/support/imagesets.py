"""Small image folders for data-plane tests: every image says which sample it is, so a batch can be traced back."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_tagged_folder(root: Path, n: int, classes: int = 4, seed: int = 0) -> dict[str, tuple[int, bytes]]:
    """`root/c<k>/img<i>.png`: lossless PNGs of varied size (so shards come out uneven) whose pixel (0, 0) holds
    the sample id (R + 256 G) and the class (B). Returns key -> (label, file bytes)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        label = i % classes
        side = int(rng.integers(6, 20))
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        pixels[0, 0] = (i % 256, i // 256, label)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        folder = root / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:04d}.png").write_bytes(buf.getvalue())
        out[f"c{label}/img{i:04d}"] = (label, buf.getvalue())
    return out


def write_jpeg_folder(root: Path, n: int, classes: int = 3, seed: int = 0) -> dict[str, tuple[int, bytes]]:
    """`root/<class>/<name>.jpg` photos-like JPEGs (plus a dotted file name), for byte-exact round trips."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        label = i % classes
        name = f"n0{label}_{i}.v2" if i == 0 else f"n0{label}_{i}"  # a dot inside the stem
        pixels = rng.integers(0, 256, (int(rng.integers(8, 40)), 24, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.jpg").write_bytes(buf.getvalue())
        out[f"class_{label}/{name.replace('.', '_')}"] = (label, buf.getvalue())
    return out


class IdTag:
    """A transform that returns (sample id, class, one random draw): traces a batch row back to its image and
    shows the augmentation RNG state."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        r, g, b = img.getpixel((0, 0))[:3]
        return torch.tensor([r + 256 * g, b, torch.rand(()).item()], dtype=torch.float64)


class Pid:
    """A transform returning the id of the process that ran it."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.tensor([float(os.getpid())])


def ids_of(batches) -> list[int]:
    """Sample ids of a loader's batches, in order."""
    return [int(v) for b in batches for v in b.inputs[:, 0]]


def write_unlabelled_folder(root: Path, n: int, layout: str = "flat", seed: int = 0) -> list[str]:
    """The tagged images of `write_tagged_folder` without class folders: `flat` (`root/img<i>.png`) or `dated`
    (`root/<year>/<month>/<day>/img<i>.png`, days and cameras at mixed depths). Returns the relative paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        side = int(rng.integers(6, 20))
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        pixels[0, 0] = (i % 256, i // 256, 0)
        if layout == "flat":
            rel = f"img{i:04d}.png"
        else:
            rel = f"2024/{1 + i % 3:02d}/{1 + i % 5:02d}/img{i:04d}.png" if i % 4 else f"2024/cam{i % 2}/img{i:04d}.png"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, format="PNG")
        paths.append(rel)
    return paths


def write_wds(root, n: int, shards: int, label: str = "cls", extra: bool = True) -> dict[str, int]:
    """`root/shard-00000k.tar` as webdataset's ShardWriter writes them: `<key>.png` + `<key>.cls` (or `.json`
    {"label": ...}, or nothing), plus a `.txt` caption; keys `s<i>`; one key with a long (pax) name."""
    images = write_tagged_folder(root / "src", n, classes=3)
    root.mkdir(exist_ok=True)
    want = {}
    items = sorted(images.items(), key=lambda kv: int(kv[0].split("img")[1]))
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for i, (_, (lab, data)) in enumerate(items):
                if i % shards != s:
                    continue
                key = f"s{i:05d}" if i != 1 else "x" * 120 + "1"
                members = [(f"{key}.png", data)]
                if label == "cls":
                    members.append((f"{key}.cls", str(lab).encode()))
                elif label == "json":
                    members.append((f"{key}.json", json.dumps({"label": lab, "url": "http://x"}).encode()))
                if extra:
                    members.append((f"{key}.txt", b"a caption"))
                for name, blob in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
                want[key] = lab if label != "none" else -1
    return want


def write_hf_parquet(root: Path, n: int, files: int = 2, labels: bool = True, row_group: int = 7,
                     corrupt: tuple[int, ...] = ()) -> None:
    """`root/train-0000k-of-0000f.parquet` as Hugging Face `datasets` writes an image set: `image:
    struct<bytes, path>` and an int64 `label`, in row groups of `row_group`; rows in `corrupt` hold no image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = write_tagged_folder(root / "src", n, classes=3)
    items = sorted(images.items(), key=lambda kv: int(kv[0].split("img")[1]))
    root.mkdir(exist_ok=True)
    for f in range(files):
        rows = [(i, lab, data) for i, (_, (lab, data)) in enumerate(items) if i % files == f]
        image = [{"bytes": b"not an image" if i in corrupt else data, "path": f"img{i}.png"} for i, _, data in rows]
        columns = {"image": image}
        if labels:
            columns["label"] = pa.array([lab for _, lab, _ in rows], pa.int64())
        pq.write_table(pa.table(columns), root / f"train-{f:05d}-of-{files:05d}.parquet", row_group_size=row_group)
