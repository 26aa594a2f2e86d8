"""Training throughput: `barlow run pretrain` against a bare loop of the same model, loss and optimizer.

    PYTHONPATH=. .venv/bin/python bench/train.py                      # digits + 28 px grayscale, 1 process
    PYTHONPATH=. .venv/bin/python bench/train.py --nproc 1 2 --steps 40
    PYTHONPATH=. .venv/bin/python bench/train.py --sets digits --repeats 5  # the median of 5 ratios

In one run, for each data set:
- the pipeline: `barlow run pretrain SPEC` (torchrun, real JPEG/PNG folders, the loader, augmentation, metrics,
  checkpoints), pairs/s read from the `time` of its metrics.jsonl lines after the first log interval (start-up,
  the first loader and the last checkpoint are left out; epoch boundaries are in);
- the bare loop: the same model, loss, LARS and schedule on random tensors already in memory, on as many
  processes as the pipeline run (more than one: gloo ranks under DDP with the runtime's options, the cores split
  between them as `barlow run` splits them, the loss over the global batch), bf16 autocast where the CPU supports
  it, the model channels-last under bf16 and the inputs always channels-last (as the runtime does: the feed hands
  over channels-last views; in fp32 on this AMD EPYC that is ~15 % faster than contiguous inputs), timed before
  and after each pipeline run (the machine may be shared: each run is compared with the mean of the bare runs
  beside it; with --repeats the runs alternate, and the median ratio is printed).
The ratio pipeline / bare loop is the number to watch (target >= 0.9x).

Data sets: the demo digits (`barlow data demo`, 32 px RGB JPEGs) and a synthetic Fashion-MNIST stand-in
(28 px grayscale PNGs of smooth random shapes; the real one needs Debian's dataset-fashion-mnist, see quality.py;
decode and augmentation costs depend on the size and format, not on the content).
Model: ResNet-18, small-image stem, width 16, projector 2048-2048-2048, batch 128.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from barlow.distributed import _autocast_dtype
from barlow.loss import BarlowTwinsLoss
from barlow.model import BarlowTwins
from barlow.optim import LARS, WarmupCosine, param_groups
from barlow.spec import OptimSpec

MODEL = {"arch": "resnet18", "small_images": True, "width": 16, "projector": "2048-2048-2048"}
BATCH = 128
SETS = {"digits": {"image_size": 32, "channels": 3}, "fmnist-synthetic": {"image_size": 28, "channels": 1}}


def write_digits(root: Path) -> Path:
    from barlow.data.demo import write_demo

    if not (root / "train").exists():
        write_demo(str(root), size=32)
    return root / "train"


def write_fmnist_like(root: Path, per_class: int = 200) -> Path:
    """10 classes of 28 px grayscale PNGs: blurred random blobs, about Fashion-MNIST's file size."""
    train = root / "train"
    if train.exists():
        return train
    rng = np.random.default_rng(0)
    for c in range(10):
        (train / f"{c}").mkdir(parents=True)
        for i in range(per_class):
            small = rng.random((7, 7)) * (rng.random((7, 7)) > 0.4)
            img = Image.fromarray(np.uint8(small * 255)).resize((28, 28), Image.BICUBIC)
            img.save(train / f"{c}" / f"{i:05d}.png")
    return train


def pipeline_pairs_per_s(train: Path, size: int, channels: int, nproc: int, steps: int, work: Path,
                         repeat: int = 0) -> dict:
    n_images = sum(1 for _ in train.rglob("*.*"))
    steps_per_epoch = n_images // BATCH
    epochs = -(-steps // steps_per_epoch)
    log_every = 5
    out = work / f"run-{train.parent.name}-{nproc}-{repeat}"  # a run of its own: never a resume of an earlier one
    spec = {"kind": "pretrain", "name": "bench-train",
            "data": {"train": str(train), "image_size": size, "channels": channels, "workers": 1},
            "model": MODEL, "optim": {"epochs": epochs, "batch_size": BATCH, "warmup_epochs": 1},
            "runtime": {"nproc_per_node": nproc, "device": "cpu", "log_every": log_every, "seed": 0},
            "output": {"url": str(out), "checkpoint_every": 10_000_000, "keep": 1}}
    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "barlow.cli", "run", "pretrain", str(path)], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"barlow run pretrain failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    first, last = rows[0], rows[-1]  # the first log line ends start-up and the first steps
    pairs = (last["step"] - first["step"]) * BATCH
    return {"pairs_per_s": pairs / (last["time"] - first["time"]), "steps_timed": last["step"] - first["step"],
            "nproc": nproc, "workers": 1, "images": n_images}


def bare_pairs_per_s(size: int, channels: int, steps: int, nproc: int = 1, warmup: int = 3) -> dict:
    """The bare loop's global pairs/s on `nproc` processes: one process as it is; more as gloo ranks under DDP
    (as the runtime wraps them), the threads split as `barlow run` splits them, each rank a 1/nproc of the batch."""
    if nproc == 1:
        return _bare_loop(size, channels, steps, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(_bare_rank, args=(nproc, port, size, channels, steps, warmup, str(out)), nprocs=nproc)
        return json.loads(out.read_text())


def _bare_rank(rank: int, nproc: int, port: int, size: int, channels: int, steps: int, warmup: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))  # barlow.launch.local's OMP_NUM_THREADS
    torch.distributed.init_process_group("gloo", rank=rank, world_size=nproc)
    try:
        result = _bare_loop(size, channels, steps, warmup, nproc)
    finally:
        torch.distributed.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def _bare_loop(size: int, channels: int, steps: int, warmup: int, nproc: int = 1) -> dict:
    torch.manual_seed(0)
    o = OptimSpec(batch_size=BATCH, epochs=1)
    dtype = _autocast_dtype("auto", torch.device("cpu"))
    model = BarlowTwins(MODEL["arch"], MODEL["projector"], MODEL["small_images"], MODEL["width"], in_channels=channels)
    if dtype:
        model = model.to(memory_format=torch.channels_last)
    optimizer = LARS(param_groups(model, o.lr_weights, o.lr_biases), lr=0.0, weight_decay=o.weight_decay, momentum=o.momentum)
    if nproc > 1:  # runsetup.wrap_ddp's options
        model = DistributedDataParallel(model, gradient_as_bucket_view=True, static_graph=True)
    schedule = WarmupCosine(1, warmup + steps, BATCH)
    loss_fn = BarlowTwinsLoss(o.lambd)  # over the global batch: gathers across ranks
    x1, x2 = (torch.randn(BATCH // nproc, channels, size, size).contiguous(memory_format=torch.channels_last)
              for _ in range(2))
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        schedule.apply(optimizer, step)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            z1, z2 = model(x1, x2)
        loss = loss_fn(z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    float(loss.detach())  # sync: the clock stops after the last step
    return {"pairs_per_s": steps * BATCH / (time.perf_counter() - start), "bf16": dtype is not None,
            "threads": torch.get_num_threads(), "nproc": nproc}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="steps of each measured run")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1], help="process counts of the pipeline runs")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--repeats", type=int, default=1, help="pipeline runs per process count (a bare run between "
                    "each two); the median ratio is printed after them")
    ap.add_argument("--json", default="runs/bench-train/train.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="barlow-bench-train-"))
    results = {"machine": f"{cpu_name()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "load_before": os.getloadavg(), "sets": {}}
    for name in args.sets:
        cfg = SETS[name]
        train = (write_digits if name == "digits" else write_fmnist_like)(work / name)
        bare, runs = [], []
        for n in args.nproc:
            # bare, pipeline, bare, pipeline, ..., bare: each pipeline run against the bare runs beside it, as the
            # machine's speed drifts
            bare_n = [bare_pairs_per_s(cfg["image_size"], cfg["channels"], args.steps, n)]
            for repeat in range(args.repeats):
                runs.append(pipeline_pairs_per_s(train, cfg["image_size"], cfg["channels"], n, args.steps, work, repeat))
                bare_n.append(bare_pairs_per_s(cfg["image_size"], cfg["channels"], args.steps, n))
                runs[-1]["bare_pairs_per_s"] = (bare_n[-2]["pairs_per_s"] + bare_n[-1]["pairs_per_s"]) / 2
                runs[-1]["ratio"] = runs[-1]["pairs_per_s"] / runs[-1]["bare_pairs_per_s"]
            bare += bare_n
        results["sets"][name] = {"bare_loop": bare, "pipeline": runs, **cfg}
    results["load_after"] = os.getloadavg()
    print(f"machine: {results['machine']}; load average before {results['load_before'][0]:.1f}, "
          f"after {results['load_after'][0]:.1f}")
    print("| data | `barlow run pretrain` | pairs/s | bare loop pairs/s, as many processes (mean of the runs before and "
          "after) | ratio |")
    print("|---|---|---:|---:|---:|")
    for name, r in results["sets"].items():
        for p in r["pipeline"]:
            print(f"| {name} ({r['image_size']} px, {r['channels']} ch) | {p['nproc']} process(es) | "
                  f"{p['pairs_per_s']:.0f} | {p['bare_pairs_per_s']:.0f} | {p['ratio']:.2f}x |")
        for n in args.nproc:
            if args.repeats > 1:
                ratios = [p["ratio"] for p in r["pipeline"] if p["nproc"] == n]
                print(f"| {name} | {n} process(es): median of {len(ratios)} | | | **{np.median(ratios):.2f}x** |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
