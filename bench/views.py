"""Device-side views benchmark: barlow.augment.DeviceViews (batched) against the per-sample v2 views it replaces.

  .venv/bin/python bench/views.py [--rounds 5] [--sizes 224 32]            # CPU, one torch thread (per core)
  .venv/bin/python bench/views.py --host-part [--batch 256]                # host microseconds per image, decode: gpu
  .venv/bin/python bench/views.py --device cuda [--batch 256] [--batches 20]  # decode + both views on a GPU
  .venv/bin/python bench/views.py --dry-run                                # every mode, tiny sizes, on the CPU

CPU mode: uint8 crops of scikit-learn's two sample photos (random boxes, resized to the size, flipped), as the host
hands them over; per size it times (a) the per-sample v2 ops of TwoViews after crop + flip (jitter, grayscale,
barlow's matrix GaussianBlur, solarize, normalise: what runs in the loader workers today) on each crop for both views,
(b) DeviceViews on the batch, hue="hsv" (the default, torchvision's HSV hue), (c) the same with hue="linear" (YIQ
rotation), interleaved in rounds, median views/s. Also the mean |difference| between linear and HSV hue over the
drawn hue factors, on [0, 1] pixels.

Host part (`--host-part`, also printed before the GPU mode): the CPU microseconds per image of everything the host
does for `data.decode: gpu` on ImageNet-sized JPEGs: in the loader worker HostCrops(decode="gpu") (header, crop
boxes, flips, the GPU-decodability check from the header) and the collate into an `Encoded` (the bytes copied once);
in the training process the copy to pinned memory (a reused buffer here: there is no pinned memory without CUDA),
the split of the bytes per image and the boxes and flips read as lists (the feed). Measured three ways: in one process
(the work itself), and served by a real loader worker (whole-process CPU time of both processes per batch: the
work, pickling, passing file descriptors, mapping and page faults), once with the worker's buffers given back as
the feed does (barlow.data.handover), once never given back: fresh shared memory per batch, torch's own hand-over.
Target: at most 20 us/image of work (the loader worker's part and the feed; the pinning copy is shown beside it).

GPU mode: ImageNet-sized JPEGs (500x375, quality 90) in memory, crop boxes drawn on the host with RandomResizedCrop's
distribution; per batch: barlow.data.devicedecode.decode_views (nvJPEG batch decode, two crops per image) + DeviceViews
on the device, synchronised; reports views/s for decode + views, and for the views alone.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))  # the reference views

from reference_views import TwoViews, VariantViews, adjust_hue_linear  # noqa: E402

from barlow.augment import DeviceViews, ViewsConfig, adjust_hue  # noqa: E402


def photos() -> list[torch.Tensor]:
    """scikit-learn's two sample photos (427x640); where scikit-learn is missing (a bare GPU image), two smooth
    synthetic pictures of that size, so the GPU mode still runs."""
    try:
        from sklearn.datasets import load_sample_images

        return [torch.from_numpy(np.array(a)).permute(2, 0, 1) for a in load_sample_images().images]
    except ImportError:
        yy, xx = np.mgrid[0:427, 0:640]
        return [torch.from_numpy(np.stack([128 + 100 * np.sin(xx / (9 + k) + yy / 31), 128 + 100 * np.cos(yy / (7 + k)),
                                           (xx + yy) * 255 / 1067], axis=0).astype(np.uint8)) for k in range(2)]


def crops(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n uint8 (3, size, size) crops as the host makes them (random box, bicubic antialias resize, random flip)."""
    from torchvision.transforms import v2

    rng = np.random.default_rng(seed)
    out = []
    for i, img in enumerate(photos() * ((n + 1) // 2)):
        if i == n:
            break
        h, w = img.shape[1:]
        side = int(rng.integers(min(h, w) // 4, min(h, w)))
        top, left = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        c = v2.functional.resized_crop(img, top, left, side, side, [size, size],
                                       interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        out.append(c.flip(-1) if rng.random() < 0.5 else c)
    return torch.stack(out)


def per_sample_views(size: int):
    """TwoViews' ops after crop + flip, per sample (what DeviceViews replaces)."""
    from torchvision.transforms import v2

    two = TwoViews(size)
    after = [v2.Compose([t for t in view.transforms[3:]]) for view in (two.view1, two.view2)]
    names = [type(t).__name__ for t in two.view1.transforms[:3]]
    assert names == ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip"], names  # the cut is where we think
    return lambda batch: [(after[0](x), after[1](x)) for x in batch]


def cpu_bench(sizes: list[int], rounds: int, batch: dict[int, int], compiled: bool = False) -> None:
    torch.set_num_threads(1)
    print(f"CPU, one torch thread, median of {rounds} interleaved rounds, views per CPU-second of this process "
          "(per core; 2 views per image)\n")
    print("| size | batch | (a) per-sample v2 views | (b) DeviceViews hsv | (b)/(a) | (c) DeviceViews linear hue "
          "| (c)/(a) | linear vs HSV hue, mean abs diff |" + (" (d) DeviceViews hsv, compile=True | (d)/(a) |"
                                                            if compiled else ""))
    print("|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if compiled else ""))
    for size in sizes:
        n = batch[size]
        x1, x2 = crops(n, size, seed=1), crops(n, size, seed=2)
        torch.manual_seed(0)
        ref = per_sample_views(size)
        hsv, lin = DeviceViews(ViewsConfig(size)), VariantViews(ViewsConfig(size), hue="linear")
        runs = {"a": partial(ref, x1), "b": partial(hsv, x1, x2), "c": partial(lin, x1, x2)}
        if compiled:
            runs["d"] = partial(VariantViews(ViewsConfig(size), compile=True), x1, x2)
        for f in runs.values():  # warm-up (compiling: other seeds reach other subset sizes)
            for seed in range(3):
                f(seed=seed) if f.func is not ref else f()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(rounds):
            for k, f in runs.items():
                t0 = time.process_time()  # CPU seconds of this process: per core, and robust to other load
                f(seed=100 + r) if f.func is not ref else f()
                times[k].append(time.process_time() - t0)
        rate = {k: 2 * n / statistics.median(v) for k, v in times.items()}
        f = hsv.draw_view(n, seed=3, view=0).hue.view(-1, 1, 1, 1)
        xf = x1.float() / 255
        diff = (adjust_hue_linear(xf, f) - adjust_hue(xf, f)).abs().mean().item()
        print(f"| {size} | {n} | {rate['a']:.0f} | {rate['b']:.0f} | {rate['b'] / rate['a']:.2f}x | {rate['c']:.0f} "
              f"| {rate['c'] / rate['a']:.2f}x | {diff:.4f} ({diff * 255:.1f}/255) |"
              + (f" {rate['d']:.0f} | {rate['d'] / rate['a']:.2f}x |" if compiled else ""))


def jpegs(n: int, seed: int = 0) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """n ImageNet-sized JPEGs (500x375 or 375x500, quality 90) cut from the sample photos; bytes and (h, w)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out, shapes = [], []
    for i in range(n):
        img = Image.fromarray(photos()[i % 2].permute(1, 2, 0).numpy())
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
        left, top = int(rng.integers(0, 60)), int(rng.integers(0, 40))
        img = img.resize((w, h), Image.BICUBIC, box=(left, top, left + 560, top + 380))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
        shapes.append((h, w))
    return out, shapes


def boxes_for(shapes: list[tuple[int, int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two RandomResizedCrop boxes (scale 0.08-1) and flips per image, drawn on the host as the loader does."""
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    rrc = v2.RandomResizedCrop(224, scale=(0.08, 1.0))
    boxes = [[list(rrc.make_params([torch.empty(3, h, w)]).values())[:4] for h, w in shapes] for _ in range(2)]
    return torch.tensor(boxes), torch.rand(2, len(shapes)) < 0.5


def device_bench(device: str, batch: int, batches: int, size: int) -> None:
    from barlow.data.devicedecode import decode_views

    dev = torch.device(device)
    data, shapes = jpegs(batch)
    views = DeviceViews(ViewsConfig(size)).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"

    crops_of = [boxes_for(shapes, seed=b) for b in range(batches)]  # the host's part, outside the timing

    linear = VariantViews(ViewsConfig(size), hue="linear").to(dev)

    def step(b: int, decode: bool, x, module=views):
        if decode:
            x, _bad = decode_views(data, *crops_of[b], size, 3, dev)
        return module(x[0], x[1], seed=b), x

    _, x = step(0, True, None)  # warm-up (nvJPEG handles, kernels)
    step(0, False, x)
    step(0, False, x, linear)
    sync()
    for label, decode, module in (("decode + both views", True, views), ("both views only", False, views),
                                  ("both views only, hue=linear", False, linear)):
        t0 = time.perf_counter()
        for b in range(batches):
            step(b, decode, x, module)
        sync()
        rate = 2 * batch * batches / (time.perf_counter() - t0)
        print(f"| {name} | {label} | {size} | {batch} | {rate:,.0f} views/s |")


class _LoaderWorkerPart(torch.utils.data.Dataset):
    """Item r: one batch of the loader worker's part: HostCrops(decode="gpu") per file, then the collate into an
    `Encoded`; with it, (CPU seconds of the headers + boxes, of the collate, of this whole process since the previous
    batch began: the work, sending the batch and serving its file descriptors)."""

    def __init__(self, files: list[bytes], rounds: int):
        from barlow.augment import HostCrops

        self.files, self.rounds, self.crops = files, rounds, HostCrops(ViewsConfig(224), decode="gpu")
        self.began: float | None = None

    def __len__(self) -> int:
        return self.rounds

    def __getitem__(self, r: int):
        t0 = time.process_time()
        whole, self.began = (t0 - self.began if self.began is not None else float("nan")), t0
        self.crops.reseed(r)
        samples = [self.crops(f, f"img{i}.jpg") for i, f in enumerate(self.files)]
        t1 = time.process_time()
        enc = self.crops.collate(samples)
        return enc, (t1 - t0, time.process_time() - t1, whole)


def host_part(batch: int, rounds: int) -> float:
    """CPU microseconds per image of the host part of data.decode: gpu (see the module doc), median over rounds (the
    first warms up); returns the whole as a loader worker serves it with its buffers given back."""
    torch.set_num_threads(1)  # as in loader workers; idle intra-op threads spinning would count as CPU time
    data, _ = jpegs(batch)
    files = [bytes(d.numpy()) for d in data]
    pinned = torch.empty(sum(len(f) for f in files) * 2, dtype=torch.uint8)  # the pinning thread's reused buffer

    def us(seconds: list[float]) -> float:
        return statistics.median(seconds[1:]) / batch * 1e6

    def trainer(enc, give_back: bool) -> float:  # the training process's part, as on CUDA; returns the feed's part
        pinned[:enc.blob.numel()].copy_(enc.blob)  # Encoded.pin_memory's copy (no pinned memory without CUDA)
        if give_back:
            enc.release()
        t0 = time.process_time()
        _ = enc.data, enc.boxes.tolist(), enc.flips.tolist(), enc.host_index.tolist()  # the feed, decode_views
        return time.process_time() - t0

    part = _LoaderWorkerPart(files, rounds + 1)
    parts: list[list[float]] = [[], [], [], []]  # headers + boxes, collate, the feed, the pinning thread's copy
    for r in range(len(part)):  # each batch freed before the next is made: nothing is sent
        t0 = time.process_time()
        enc, (crops_s, collate_s, _) = part[r]
        parts[2].append(trainer(enc, give_back=True))
        parts[0].append(crops_s)
        parts[1].append(collate_s)
        parts[3].append(time.process_time() - t0 - crops_s - collate_s - parts[2][-1])
        del enc
    work = sum(us(p) for p in parts[:3])
    print(f"| the work itself, in one process (headers + boxes {us(parts[0]):.1f}, collate {us(parts[1]):.1f}, the "
          f"feed on the training thread {us(parts[2]):.1f}; the pinning thread's copy {us(parts[3]):.1f} more) "
          f"| {batch} | {work:.1f} us/image |")

    for give_back, how in ((True, "its buffers given back (barlow.data.handover)"),
                           (False, "fresh shared memory per batch (buffers never given back: torch's hand-over)")):
        worker, training = [], []
        batches = iter(torch.utils.data.DataLoader(_LoaderWorkerPart(files, rounds + 2), batch_size=None,
                                                   num_workers=1))
        while True:
            t0 = time.process_time()
            got = next(batches, None)
            if got is None:
                break
            enc, (_, _, whole) = got
            trainer(enc, give_back)
            del enc
            training.append(time.process_time() - t0)
            worker.append(whole)
        worker, training = worker[1:], training[1:]  # the first batch's worker time is unknown (nan)
        total = us(worker) + us(training)
        print(f"| served by a loader worker, {how} (worker process {us(worker):.1f}, training process "
              f"{us(training):.1f}) | {batch} | {total:.1f} us/image |")
        if give_back:
            served = total
    return served


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu: batched vs per-sample views per core; cuda: decode + views")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256, help="images per batch in --device cuda mode")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="also DeviceViews(compile=True) (CPU mode; compiles first)")
    ap.add_argument("--host-part", action="store_true", help="host microseconds per image of data.decode: gpu")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, every mode, on the CPU: proves it runs")
    a = ap.parse_args()
    if a.dry_run:
        cpu_bench([32], rounds=1, batch={32: 8})
        print()
        host_part(batch=4, rounds=1)
        device_bench("cpu", batch=4, batches=1, size=32)
    elif a.host_part:
        print("| what | batch | host CPU time |\n|---|---:|---:|")
        host_part(a.batch, a.rounds)
    elif a.device == "cpu":
        cpu_bench(a.sizes, a.rounds, batch={s: 64 if s >= 128 else 512 for s in a.sizes}, compiled=a.compile)
    else:
        host_part(a.batch, rounds=3)
        print("| device | what | size | batch | rate |\n|---|---|---:|---:|---:|")
        device_bench(a.device, a.batch, a.batches, 224)


if __name__ == "__main__":
    main()
