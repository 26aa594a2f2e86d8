"""Data-loading benchmark: images per second per core for decode + BYOL's two-view augmentation.

  .venv/bin/python bench/data.py [--images 2000] [--measure 300] [--rounds 3] [--size 224]

On ImageNet-sized JPEGs (500x375 or 375x500, quality 88-92) cut from scikit-learn's two bundled photos by random
crops, flips and re-encoding into a temporary folder, it times, in one process with one torch thread (per core):
  (a) reference: torchvision ImageFolder + PIL + v1 transforms of BYOL's views (as in the Barlow Twins repo),
  (b) barlow's shard loader from local disk (barlow.augment.TwoViews, crop-first + JPEG draft decoding),
  (c) the same loader from a SeaweedFS S3 server on 127.0.0.1 (tests/s3server.py),
plus (b0), (b) with the crop-first path off (plain full-size decode), to show what that path adds.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


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


class ReferenceCrops:
    """(a-crop): two views of random-resized crop + flip + normalise with v1 transforms on PIL."""

    def __init__(self, size: int):
        import torchvision.transforms as T

        self.view = T.Compose([T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
                               T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])

    def __call__(self, img):
        return self.view(img), self.view(img)


class CropOnlyViews:
    """(b-crop): the same two views with v2 transforms, shaped like TwoViews so the crop-first path applies."""

    def __init__(self, size: int):
        from torchvision.transforms import v2

        self.view1 = self.view2 = v2.Compose([
            v2.ToImage(), v2.RandomResizedCrop(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), v2.ToPureTensor()])

    def __call__(self, img):
        return self.view1(img), self.view2(img)


def draft_share(folder: Path, views, limit: int = 300) -> float:
    """Fraction of images the crop-first path decodes at reduced size (both views' crops allow it)."""
    from barlow.data.cropfirst import CropFirst

    fast = CropFirst.wrap(views, 3)
    files = sorted(folder.rglob("*.JPEG"))[:limit]
    torch.manual_seed(0)
    reduced = 0
    for f in files:
        fast(f.read_bytes(), f.name)
        reduced += fast.last_scale > 1
    return reduced / len(files)


def rate(batches, limit: int) -> float:
    """Images per second over the first `limit` images of an iterable of batches (after one warm-up batch)."""
    it = iter(batches)
    next(it)
    seen, start = 0, time.perf_counter()
    for batch in it:
        seen += len(batch[1])
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
    from s3server import S3Server
    from torch.utils.data import DataLoader

    from barlow import storage
    from barlow.augment import TwoViews
    from barlow.data.shards import write_shards
    from barlow.data.stream import ShardSource
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
            storage.configure_s3(**s3spec.model_dump())
            fs, _ = storage.filesystem("s3://x")
            fs.put(str(root / "shards"), f"{server.bucket}/shards", recursive=True)

            views = TwoViews(args.size)
            local = ShardSource(str(root / "shards" / "index.json"),
                                DataSpec(format="shards", train=str(root / "shards" / "index.json"), workers=0))
            remote = ShardSource(f"s3://{server.bucket}/shards/index.json",
                                 DataSpec(format="shards", train=f"s3://{server.bucket}/shards/index.json", workers=0,
                                          s3=s3spec))
            reference = torchvision.datasets.ImageFolder(str(root / "folder"), ReferenceViews(args.size))
            reference_crops = torchvision.datasets.ImageFolder(str(root / "folder"), ReferenceCrops(args.size))
            crops = CropOnlyViews(args.size)

            def shard_epoch(src, transform, epoch):
                return src.loader(transform=transform, batch_size=args.batch, rank=0, world_size=1, seed=0, epoch=epoch)

            configs = {
                "(a) torchvision ImageFolder + PIL + v1 transforms (reference)":
                    lambda e: DataLoader(reference, batch_size=args.batch, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(e)),
                "(b0) barlow shards, local disk, full-size decode": lambda e: shard_epoch(local, lambda im: views(im), e),
                "(b) barlow shards, local disk": lambda e: shard_epoch(local, views, e),
                "(c) barlow shards, S3 on 127.0.0.1": lambda e: shard_epoch(remote, views, e),
                "(a-crop) reference loader, crops + flip only":
                    lambda e: DataLoader(reference_crops, batch_size=args.batch, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(e)),
                "(b-crop) barlow shards, local disk, crops + flip only": lambda e: shard_epoch(local, crops, e),
            }
            results: dict[str, list[float]] = {name: [] for name in configs}
            for r in range(args.rounds):
                for name, make in configs.items():
                    results[name].append(rate(make(r), args.measure))
                    print(f"round {r + 1}: {name}: {results[name][-1]:.1f} img/s", file=sys.stderr, flush=True)
        finally:
            server.stop()

        share = {"TwoViews": draft_share(root / "folder", views), "crops only": draft_share(root / "folder", crops)}
    med = {name: statistics.median(v) for name, v in results.items()}
    ref, loc = med["(a) torchvision ImageFolder + PIL + v1 transforms (reference)"], med["(b) barlow shards, local disk"]
    print(f"\n{args.images} JPEGs, {nbytes / args.images / 1024:.0f} KiB each on average, {args.size} px views, "
          f"1 process, 1 torch thread, median of {args.rounds} rounds x {args.measure} images\n")
    print("| loader | images/s per core | vs (a) | vs (b) |\n|---|---:|---:|---:|")
    for name, v in med.items():
        print(f"| {name} | {v:.1f} | {v / ref:.2f}x | {v / loc:.2f}x |")
    crop_ref = med["(a-crop) reference loader, crops + flip only"]
    print(f"\n(b-crop) / (a-crop): {med['(b-crop) barlow shards, local disk, crops + flip only'] / crop_ref:.2f}x; "
          + ", ".join(f"{k}: {v:.0%} of images decoded at reduced size" for k, v in share.items()))


if __name__ == "__main__":
    main()
