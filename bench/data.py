"""Data-loading benchmark: host cost of decode + BYOL's two views, as CPU cores per 1,000 training pairs/s.

  .venv/bin/python bench/data.py [--images 2000] [--measure 300] [--rounds 3] [--size 224]

On ImageNet-sized JPEGs (500x375 or 375x500, quality 88-92) cut from scikit-learn's two bundled photos by random
crops, flips and re-encoding into a temporary folder, it times, in one process with one torch thread (per core),
what the loader workers (the host) do per training pair:
  (a) reference: torchvision ImageFolder + PIL + v1 transforms of BYOL's views (as in the Barlow Twins repo),
  (b) barlow, data.decode=cpu: shard loader from local disk, HostCrops (crop boxes from the JPEG header, crop-first
      draft decoding, uint8 crops at output size, flips); the rest of the views runs on the training device,
  (c) barlow, data.decode=gpu: the same loader reading bytes and choosing boxes + flips only (the device decodes),
  (b-s3) (b) from a SeaweedFS S3 server on 127.0.0.1 (tests/support/s3server.py),
  (v) the per-sample host path: the whole two views (tests/support/reference_views.TwoViews) in the workers, for comparison.
The device half (batched views, GPU decode) is not timed here: bench/views.py and bench/gpu/gpu.py measure it.
The configurations run interleaved in rounds and each reports its median, since other work on a shared machine
slows whichever runs at the wrong moment. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_images(root: Path, n: int, classes: int = 10, seed: int = 0) -> int:
    """n distinct ImageNet-sized JPEGs in root/<class>/; returns total bytes."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 427x640 each
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
        scale = rng.uniform(0.55, 1.0)  # a random window of the photo, resized to the target size
        cw, ch = min(photo.width, int(photo.height * w / h * scale)), int(photo.height * scale)
        cw, ch = max(cw, 32), max(min(ch, int(cw * h / w)), 32)
        left, top = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
        img = photo.resize((w, h), Image.BICUBIC, box=(left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(88, 93)))
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:06d}.JPEG").write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total


class _Blur:
    """The Barlow Twins repo's GaussianBlur: PIL's filter with sigma in [0.1, 2.0]."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        if np.random.rand() < self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=np.random.rand() * 1.9 + 0.1))
        return img


class _Solarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if np.random.rand() < self.p else img


class ReferenceViews:
    """BYOL's two views with torchvision v1 transforms on PIL images (facebookresearch/barlowtwins main.py)."""

    def __init__(self, size: int):
        import torchvision.transforms as T

        def view(blur: float, solarize: float):
            return T.Compose([
                T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                T.RandomGrayscale(p=0.2), _Blur(blur), _Solarize(solarize), T.ToTensor(),
                T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
        self.v1, self.v2 = view(1.0, 0.0), view(0.1, 0.2)

    def __call__(self, img):
        return self.v1(img), self.v2(img)


def draft_share(folder: Path, crops, limit: int = 300) -> float:
    """Fraction of images HostCrops decodes at reduced size (both views' crops allow it)."""
    files = sorted(folder.rglob("*.JPEG"))[:limit]
    crops.reseed(0)
    reduced = 0
    for f in files:
        crops(f.read_bytes(), f.name)
        reduced += crops.last_scale > 1
    return reduced / len(files)


def rate(batches, limit: int) -> float:
    """Images per second over the first `limit` images of an iterable of batches (after one warm-up batch)."""
    it = iter(batches)
    next(it)
    seen, start = 0, time.perf_counter()
    for batch in it:
        seen += len(batch.labels if hasattr(batch, "labels") else batch[1])
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000, help="distinct JPEGs to generate")
    ap.add_argument("--measure", type=int, default=300, help="images timed per configuration and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=224, help="output side of the views")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)  # per core

    import torchvision
    from reference_views import TwoViews, TwoViewsCropFirst
    from s3server import S3Server
    from torch.utils.data import DataLoader

    from barlow import storage
    from barlow.augment import HostCrops, ViewsConfig
    from barlow.data.shardreader import ShardSource
    from barlow.data.shards import write_shards
    from barlow.spec import DataSpec, S3Spec

    with tempfile.TemporaryDirectory(prefix="barlow-bench-") as tmp:
        root = Path(tmp)
        nbytes = make_images(root / "folder", args.images)
        write_shards(str(root / "folder"), str(root / "shards"), shard_size=64 << 20, progress=False)
        server = S3Server(root / "s3").start()
        try:
            for k, v in server.env.items():
                os.environ[k] = v
            s3spec = S3Spec(endpoint_url=server.endpoint_url)
            fs, _ = storage.filesystem("s3://x", storage.S3Settings(**s3spec.model_dump()))
            fs.put(str(root / "shards"), f"{server.bucket}/shards", recursive=True)

            local = ShardSource(str(root / "shards" / "index.json"),
                                DataSpec(format="shards", train=str(root / "shards" / "index.json"), workers=0))
            remote = ShardSource(f"s3://{server.bucket}/shards/index.json",
                                 DataSpec(format="shards", train=f"s3://{server.bucket}/shards/index.json", workers=0,
                                          s3=s3spec))
            reference = torchvision.datasets.ImageFolder(str(root / "folder"), ReferenceViews(args.size))
            cpu_crops, gpu_crops = (HostCrops(ViewsConfig(args.size), decode="cpu"),
                                    HostCrops(ViewsConfig(args.size), decode="gpu"))

            def shard_epoch(src, transform, epoch):
                return src.loader(transform=transform, batch_size=args.batch, rank=0, world_size=1, seed=0, epoch=epoch)

            configs = {
                REF: lambda e: DataLoader(reference, batch_size=args.batch, shuffle=True, num_workers=0,
                                          generator=torch.Generator().manual_seed(e)),
                CPU: lambda e: shard_epoch(local, cpu_crops, e),
                GPU: lambda e: shard_epoch(local, gpu_crops, e),
                "(b-s3) as (b), shards on S3 at 127.0.0.1": lambda e: shard_epoch(remote, cpu_crops, e),
                "(v) per-sample host path: both whole views in the workers (TwoViews)":
                    lambda e: shard_epoch(local, TwoViewsCropFirst(TwoViews(args.size)), e),
            }
            results: dict[str, list[float]] = {name: [] for name in configs}
            for r in range(args.rounds):
                for name, make in configs.items():
                    results[name].append(rate(make(r), args.measure))
                    print(f"round {r + 1}: {name}: {results[name][-1]:.1f} pairs/s", file=sys.stderr, flush=True)
        finally:
            server.stop()
        share = draft_share(root / "folder", cpu_crops)
    med = {name: statistics.median(v) for name, v in results.items()}
    cores = {name: 1000 / v for name, v in med.items()}
    print(f"\n{args.images} JPEGs, {nbytes / args.images / 1024:.0f} KiB each on average, {args.size} px views, "
          f"1 process, 1 torch thread, median of {args.rounds} rounds x {args.measure} pairs\n")
    print("| host side of the loader | pairs/s per core | cores per 1,000 pairs/s | vs (a) |\n|---|---:|---:|---:|")
    for name in med:
        print(f"| {name} | {med[name]:.1f} | {cores[name]:.1f} | {cores[name] / cores[REF]:.2f} |")
    print(f"\ntargets: (b) <= 1/3 of (a)'s cores: {cores[CPU] / cores[REF]:.2f} "
          f"({'met' if cores[CPU] <= cores[REF] / 3 else 'NOT met'}); (c) <= 1/10: {cores[GPU] / cores[REF]:.3f} "
          f"({'met' if cores[GPU] <= cores[REF] / 10 else 'NOT met'}); {share:.0%} of images decoded at reduced size")


REF = "(a) torchvision ImageFolder + PIL + v1 transforms of BYOL's views (reference)"
CPU = "(b) barlow, data.decode=cpu: header, crop-first decode, uint8 crops, flips"
GPU = "(c) barlow, data.decode=gpu: bytes + boxes + flips only (host part)"


if __name__ == "__main__":
    main()
