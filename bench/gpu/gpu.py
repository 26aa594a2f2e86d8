"""GPU benchmark: Barlow Twins training steps (ResNet-50, 224 px) on one GPU, each speed option on and off.

    python bench/gpu/gpu.py --out bench/results/gpu          # on a CUDA machine (bench/gpu.sh runs it)
    python bench/gpu/gpu.py --dry-run --out /tmp/gpu-dry     # tiny model on the CPU: checks the script, a few seconds

Mode "synthetic": the same random pair of batches every step (no data cost). One model, loss (auto path) and LARS
step per iteration, timed after warm-up steps; per configuration it reports pairs/s (wall clock over the timed
steps), the split of a step into data wait, forward (model + loss), backward and optimizer (CUDA events between the
phases, i.e. GPU time; on the CPU wall time; medians over the timed steps), the peak GPU memory allocated, and the
first step's time (compilation, cuDNN autotuning). Configurations: the reference (bf16 autocast, channels_last,
cudnn.benchmark, LARS foreach, eager), each of those four switched off alone, and the reference plus torch.compile.
"bf16 off" is what `runtime.precision: fp32` runs: float32 with cuDNN's TF32 convolutions (torch's default) and
float32 matrix products; the TF32 switches are set explicitly for every configuration.
The GPU batch is 256 pairs, the batch of issue 16's first milestone (>= 1,200 pairs/s on one H100/H200).

Mode "shards": synthetic JPEGs (about ImageNet's size) written as tar shards with barlow's writer, read through the
device data path (barlow.data.feed.TrainingFeed: loader workers read bytes and pick crops, the device decodes and
augments), the reference configuration; the data column is then the time the GPU waited for a batch. Where the
device data path is missing from this tree it prints 'device data path not available' and skips the mode.

Writes gpu-bench.json and gpu-bench.md (a markdown report) under --out, after every configuration (a run stopped
at its time limit keeps what it measured); --tag NAME writes gpu-bench-NAME.* instead. --compile skip|only picks
the eager configurations and the shards, or the compiled configuration alone (bench/gpu.sh runs it last).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a plain checkout (no install needed)

from barlow.loss import BarlowTwinsLoss  # noqa: E402
from barlow.model import BarlowTwins  # noqa: E402
from barlow.optim import LARS, param_groups  # noqa: E402

MIB = 2**20


@dataclass(frozen=True)
class Sizes:
    arch: str
    projector: str
    image: int
    batch: int  # pairs per step (per GPU)
    small_images: bool
    width: int


GPU_SIZES = Sizes("resnet50", "8192-8192-8192", 224, 256, False, 64)  # issue 16's milestone batch
DRY_SIZES = Sizes("resnet18", "64-64", 32, 8, True, 8)


@dataclass(frozen=True)
class Config:
    name: str
    bf16: bool = True
    channels_last: bool = True
    cudnn_benchmark: bool = True
    lars_foreach: bool = True
    compile: bool = False
    tf32_conv: bool = True  # cuDNN's default; matrix products stay float32 (torch's default) in every row


REFERENCE = Config("reference")
CONFIGS = [
    REFERENCE,
    dataclasses.replace(REFERENCE, name="bf16 off (float32, TF32 convolutions)", bf16=False),
    dataclasses.replace(REFERENCE, name="channels_last off", channels_last=False),
    dataclasses.replace(REFERENCE, name="cudnn.benchmark off", cudnn_benchmark=False),
    dataclasses.replace(REFERENCE, name="LARS foreach off (loop)", lars_foreach=False),
    dataclasses.replace(REFERENCE, name="torch.compile on", compile=True),
]


class Marks:
    """Phase boundaries of a step: CUDA events on a GPU (GPU time between them), wall time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1000 * (b - a)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # deliberate: timing boundary


def synthetic_batches(sizes: Sizes, device: torch.device, channels_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x1, x2 = (torch.randn(sizes.batch, 3, sizes.image, sizes.image, generator=g).to(device, memory_format=fmt)
              for _ in range(2))
    while True:
        yield x1, x2


def idle_gaps(busy_us: list[tuple[float, float]]) -> tuple[float | None, float | None]:
    """(longest gap in ms, idle % of the span) between the GPU's busy intervals (start, end in µs, any stream):
    where the GPU waited for the host (a decode on the critical path shows as one gap a step)."""
    if not busy_us:
        return None, None
    busy_us = sorted(busy_us)
    end, longest, idle = busy_us[0][1], 0.0, 0.0
    for start, stop in busy_us[1:]:
        if start > end:
            longest, idle = max(longest, start - end), idle + start - end
        end = max(end, stop)
    span = end - busy_us[0][0]
    return longest / 1000, 100 * idle / span if span > 0 else 0.0


TRACE_STEPS = 3  # profiled after the timed steps (reference configuration: synthetic and shard-fed)


def run_config(cfg: Config, sizes: Sizes, device: torch.device, batches: Iterator, steps: int, warmup: int,
               compile_backend: str, trace_steps: int = 0) -> dict:
    """Train `warmup + steps` steps of a fresh model under `cfg`; timings of the last `steps`; then on CUDA
    `trace_steps` more under the profiler, for the GPU's idle gaps between kernels (`idle_gaps`)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        torch.backends.cudnn.allow_tf32 = cfg.tf32_conv
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = BarlowTwins(sizes.arch, sizes.projector, sizes.small_images, sizes.width).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model, backend=compile_backend) if cfg.compile else model
    optimizer = LARS(param_groups(model, 0.2, 0.0048), lr=0.0, foreach=cfg.lars_foreach)
    loss_fn = BarlowTwinsLoss()
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    marks, timed = Marks(device), []
    t_first = t0 = time.perf_counter()
    first_step_s = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        m = [marks.mark()]
        x1, x2 = next(batches)
        m.append(marks.mark())
        with bf16:
            z1, z2 = forward(x1, x2)
        loss = loss_fn(z1, z2)
        m.append(marks.mark())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        m.append(marks.mark())
        optimizer.step()
        m.append(marks.mark())
        if i == 0:
            _sync(device)
            first_step_s = time.perf_counter() - t_first
        if i >= warmup:
            timed.append(m)
    _sync(device)
    wall = time.perf_counter() - t0
    phase = {name: statistics.median(marks.ms(s[k], s[k + 1]) for s in timed)
             for k, name in enumerate(("data_ms", "forward_ms", "backward_ms", "optimizer_ms"))}
    gap_ms = idle_pct = None
    if trace_steps and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(trace_steps):
                x1, x2 = next(batches)
                with bf16:
                    z1, z2 = forward(x1, x2)
                loss = loss_fn(z1, z2)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            _sync(device)
        kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA]
        gap_ms, idle_pct = idle_gaps(kernels)
    return {"config": cfg.name, "options": dataclasses.asdict(cfg), "pairs_per_s": steps * sizes.batch / wall,
            "step_ms": 1000 * wall / steps, **phase, "first_step_s": first_step_s,
            "peak_mib": torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None,
            "loss": float(loss.detach()), "loss_path": loss_fn.chosen_path(*z1.shape),
            "gpu_gap_ms_max": gap_ms, "gpu_idle_pct": idle_pct}


def _jpeg(args: tuple[str, int, int]) -> None:
    """One synthetic photo-like JPEG (smooth colour fields plus noise, ~500x375, quality 90)."""
    import numpy as np
    from PIL import Image

    path, seed, side = args
    rng = np.random.default_rng(seed)
    h, w = side * 3 // 4, side
    low = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 12, size=img.shape)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def write_synthetic_shards(root: Path, n_images: int, side: int, classes: int = 8) -> str:
    """An image folder of synthetic JPEGs, then tar shards + index.json with barlow's writer; returns the index URL."""
    from multiprocessing import Pool

    from barlow.data.shards import write_shards

    src, dst = root / "images", root / "shards"
    jobs = []
    for i in range(n_images):
        folder = src / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"{i:06d}.jpg"), i, side))
    with Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.map(_jpeg, jobs, chunksize=32)
    return write_shards(str(src), str(dst), shard_size=32 << 20, workers=4, seed=0, progress=False)["index"]


def shard_batches(index_url: str, sizes: Sizes, device: torch.device, workers: int) -> Iterator | None:
    """Batches of device views from the shards through the device data path; None where that path is missing."""
    try:
        from barlow.data import open_source
        from barlow.spec import DataSpec

        TrainingFeed = importlib.import_module("barlow.data.feed").TrainingFeed  # noqa: N806 (the data-path issue's module)
    except ImportError as e:
        print(f"device data path not available ({e})", file=sys.stderr)
        return None
    data = DataSpec.model_validate({"format": "shards", "train": index_url, "image_size": sizes.image, "channels": 3,
                                    "workers": workers})
    source = open_source(data, "train")
    feed = TrainingFeed(data, device)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = 0
        while True:
            loader = source.loader(transform=feed.transform, batch_size=sizes.batch, rank=0, world_size=1, seed=0,
                                   epoch=epoch, workers=workers, pin_memory=feed.pin_memory)
            for batch in feed(loader):
                yield batch.x1, batch.x2
            epoch += 1

    return batches()


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def report(meta: dict, rows: list[dict]) -> str:
    ref = next((r for r in rows if r.get("config") == "reference" and r.get("mode") == "synthetic"), None)
    lines = [f"# GPU benchmark ({meta['device_name']})", "",
             f"{meta['device_name']}, torch {meta['torch']}, CUDA {meta['cuda']}, {meta['host']}; {meta['sizes']['arch']} at "
             f"{meta['sizes']['image']} px, projector {meta['sizes']['projector']}, {meta['sizes']['batch']} pairs a step, "
             f"{meta['steps']} timed steps after {meta['warmup']} warm-up steps"
             f"{' (DRY RUN on the CPU: not a measurement)' if meta['dry_run'] else ''}.",
             "", "| mode | configuration | pairs/s | vs reference | step ms | data ms | forward ms | backward ms | optimizer ms "
             "| peak GiB | first step s | longest GPU gap ms | GPU idle % |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['config']} | failed: {r['error']} |  |  |  |  |  |  |  |  |  |  |")
            continue
        rel = f"{r['pairs_per_s'] / ref['pairs_per_s']:.2f}x" if ref and "pairs_per_s" in ref else "—"
        peak = None if r["peak_mib"] is None else r["peak_mib"] / 1024
        lines.append(f"| {r['mode']} | {r['config']} | {r['pairs_per_s']:.0f} | {rel} | {r['step_ms']:.1f} | {r['data_ms']:.1f} "
                     f"| {r['forward_ms']:.1f} | {r['backward_ms']:.1f} | {r['optimizer_ms']:.1f} | {_fmt(peak, '.1f')} "
                     f"| {r['first_step_s']:.1f} | {_fmt(r.get('gpu_gap_ms_max'), '.2f')} "
                     f"| {_fmt(r.get('gpu_idle_pct'), '.1f')} |")
    for note in meta["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu-bench.json and gpu-bench.md")
    ap.add_argument("--dry-run", action="store_true", help="tiny model and sizes on the CPU: checks the script")
    ap.add_argument("--modes", nargs="+", choices=["synthetic", "shards"], default=["synthetic", "shards"])
    ap.add_argument("--configs", nargs="+", help="configuration names to run (default: all)")
    ap.add_argument("--batch", type=int, help="pairs per step (default: 256 on a GPU, 8 in a dry run)")
    ap.add_argument("--steps", type=int, help="timed steps per configuration (default 20; dry run 3)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 5; dry run 1)")
    ap.add_argument("--images", type=int, help="synthetic JPEGs for the shards mode (default 4096; dry run 64)")
    ap.add_argument("--workers", type=int, help="loader workers in the shards mode (default: CPU cores - 2)")
    ap.add_argument("--compile", choices=["all", "skip", "only"], default="all",
                    help="skip: eager configurations and shards only; only: the compiled configuration only")
    ap.add_argument("--tag", help="write gpu-bench-TAG.json / .md (default gpu-bench.json / .md)")
    args = ap.parse_args()

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("bench/gpu/gpu.py: no CUDA device (use --dry-run to check the script on the CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    sizes = dataclasses.replace(DRY_SIZES if dry else GPU_SIZES, **({"batch": args.batch} if args.batch else {}))
    steps, warmup = args.steps or (3 if dry else 20), args.warmup if args.warmup is not None else (1 if dry else 5)
    compile_backend = "aot_eager" if dry else "inductor"  # the CPU dry run checks tracing, not a C++ build
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device_name": "CPU (dry run)" if dry else torch.cuda.get_device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "host": f"{os.cpu_count()} CPU cores, {platform.machine()}", "dry_run": dry,
            "sizes": dataclasses.asdict(sizes), "steps": steps, "warmup": warmup, "notes": []}
    configs = [c for c in CONFIGS if (not args.configs or c.name in args.configs)
               and (args.compile == "all" or c.compile == (args.compile == "only"))]
    modes = [m for m in args.modes if args.compile != "only" or m == "synthetic"]
    stem = f"gpu-bench-{args.tag}" if args.tag else "gpu-bench"
    rows: list[dict] = []

    def attempt(mode: str, cfg: Config, batches: Iterator) -> None:
        print(f"{mode}: {cfg.name} ...", file=sys.stderr, flush=True)
        try:
            r = run_config(cfg, sizes, device, batches, steps, warmup, compile_backend,
                           TRACE_STEPS if cfg is REFERENCE else 0)
        except Exception as e:  # one failed configuration (OOM, a compile error) must not lose the others
            traceback.print_exc()
            r = {"config": cfg.name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        r["mode"] = mode
        rows.append(r)
        if "error" not in r:
            print(f"  {r['pairs_per_s']:.0f} pairs/s, step {r['step_ms']:.1f} ms", file=sys.stderr, flush=True)
        write()  # after every configuration: a run stopped at its time limit keeps what it measured

    def write() -> str:
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        text = report(meta, rows)
        (out / f"{stem}.md").write_text(text)
        return text

    # Eager configurations, then the shards, then compilation (the slowest to start) last.
    write()  # the meta alone: a run killed in its first configuration still says what it was
    if "synthetic" in modes:
        for cfg in (c for c in configs if not c.compile):
            attempt("synthetic", cfg, synthetic_batches(sizes, device, cfg.channels_last))
    if "shards" in modes:
        with tempfile.TemporaryDirectory(prefix="barlow-gpu-bench-") as tmp:
            try:
                t = time.perf_counter()
                index = write_synthetic_shards(Path(tmp), args.images or (64 if dry else 4096), 128 if dry else 500)
                print(f"shards written in {time.perf_counter() - t:.1f} s", file=sys.stderr)
                workers = args.workers if args.workers is not None else (0 if dry else max(1, (os.cpu_count() or 4) - 2))
                batches = shard_batches(index, sizes, device, workers)
            except Exception as e:
                traceback.print_exc()
                batches, meta["notes"] = None, [*meta["notes"], f"shards mode failed before training: {type(e).__name__}: {e}"]
            if batches is None:
                if not meta["notes"]:
                    meta["notes"].append("shards mode: device data path not available in this tree (barlow.data.feed).")
            else:
                try:
                    attempt("shards", REFERENCE, batches)
                finally:
                    batches.close()  # stops the loader's workers before the shards' folder goes
    if "synthetic" in modes:
        for cfg in (c for c in configs if c.compile):
            attempt("synthetic", cfg, synthetic_batches(sizes, device, cfg.channels_last))
    print(write())
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
