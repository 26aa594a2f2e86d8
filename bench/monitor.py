"""What the quality monitors cost: the online probe's, the kNN monitor's and the rank monitor's share of pretraining step time.

    PYTHONPATH=. .venv/bin/python bench/monitor.py                          # examples/quickstart.yaml's model, 1 process
    PYTHONPATH=. .venv/bin/python bench/monitor.py --steps 40 --json runs/bench-monitor.json

One process on this machine's device, the spec's model, batch and image size (examples/quickstart.yaml unless
--spec), the demo digits (written to a temporary folder when data/demo is missing):
- step: the median time of `train_step` (model, loss, LARS) on batches already on the device, without the probe
  and with it, interleaved step by step so a shared machine slows both alike;
- probe: the median time of the probe's own step (`OnlineProbe.step`: its forward, backward and SGD), timed
  directly, over the median step without it: its share of a step (target <= 3 %);
- kNN: one `KnnMonitor.measure` (features of the fixed val and train subsets, the vote), over the training time
  between two measurements (`monitor.knn_every_epochs` x steps/epoch x step time): its share of training time;
- rank: one `RankMonitor.measure` (backbone and projector on the fixed sample, two SVDs) over the training time
  between two measurements, on the demo and on an epoch of ImageNet's size at the same step time.
On CUDA every timed region ends with a deliberate synchronize. The probe's difference of medians is printed too; on a
shared machine it is noisier than the direct timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from barlow.spec import parse_spec


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: the timer reads the host clock


def _demo(root: Path | None) -> Path:
    if root is not None and (root / "train").exists():
        return root
    from barlow.data.demo import write_demo

    root = Path(tempfile.mkdtemp(prefix="barlow-bench-monitor-"))
    write_demo(str(root), size=32)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="examples/quickstart.yaml")
    ap.add_argument("--data", type=Path, default=Path("data/demo"), help="the demo digits (written when missing)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps with and without the probe")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from barlow.train import device_batches, set_up, train_step

    raw = yaml.safe_load(Path(args.spec).read_text())
    demo = _demo(args.data)
    raw["data"].update(train=str(demo / "train"), val=str(demo / "val"))
    raw["runtime"].update(nproc_per_node=1, device=args.device)
    out = tempfile.mkdtemp(prefix="barlow-bench-monitor-out-")
    raw["output"] = {"url": out, "checkpoint_every": 10**6}
    raw.setdefault("monitor", {})["online_probe"] = "on"
    spec = parse_spec(raw)
    run = set_up(spec)
    device = run.place.device
    batches = device_batches(spec, run.source, run.place, 0, run.steps_per_epoch)
    ready = [next(batches) for _ in range(4)]
    probe, monitors = run.monitor("probe"), run.monitors
    for b in ready[:2]:  # warm-up: first allocations, thread pools
        train_step(run, b.x1, b.x2, b.labels)
    without, with_probe, probe_only = [], [], []
    for i in range(args.steps):
        b = ready[i % len(ready)]
        x1, x2, y = b.x1, b.x2, b.labels
        run.monitors = [m for m in monitors if m is not probe]
        _sync(device)
        t0 = time.perf_counter()
        train_step(run, x1, x2, y)
        _sync(device)
        t1 = time.perf_counter()
        run.monitors = monitors
        _, _, h1 = run.forward(x1, x2, with_features=True)  # features for the direct timing (not timed)
        _sync(device)
        t2 = time.perf_counter()
        probe.step(h1, y)
        _sync(device)
        t3 = time.perf_counter()
        train_step(run, x1, x2, y)
        _sync(device)
        t4 = time.perf_counter()
        without.append(t1 - t0)
        probe_only.append(t3 - t2)
        with_probe.append(t4 - t3)
    step, step_probe, probe_step = (statistics.median(v) for v in (without, with_probe, probe_only))

    knn_every = spec.monitor.knn_every(spec.data.val is not None)
    knn_times = []
    knn_monitor, rank_monitor = run.monitor("knn"), run.monitor("rank")
    if knn_monitor is not None:
        for _ in range(2):
            _sync(device)
            t0 = time.perf_counter()
            top1 = knn_monitor.measure(run.model)["knn_top1"]
            _sync(device)
            knn_times.append(time.perf_counter() - t0)
    rank_times, ranked = [], {}
    if rank_monitor is not None:
        for _ in range(2):
            _sync(device)
            t0 = time.perf_counter()
            ranked = rank_monitor.measure(run.model)
            _sync(device)
            rank_times.append(time.perf_counter() - t0)
    run.metrics.close()
    knn = min(knn_times) if knn_times else None
    rank = min(rank_times) if rank_times else None
    rank_every = spec.monitor.rank_every(run.source.num_samples)
    rank_between = rank_every * run.steps_per_epoch * step if rank_every else None
    between = knn_every * run.steps_per_epoch * step if knn_every else None

    load = os.getloadavg()
    result = {
        "spec": args.spec, "device": str(device), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "loadavg_1m": load[0],
        "model": spec.model.model_dump(), "image_size": spec.data.image_size, "batch": spec.optim.batch_size,
        "steps_per_epoch": run.steps_per_epoch, "step_ms": 1000 * step, "step_with_probe_ms": 1000 * step_probe,
        "probe_step_ms": 1000 * probe_step, "probe_share_pct": 100 * probe_step / step,
        "probe_share_by_difference_pct": 100 * (step_probe - step) / step,
        "knn_every_epochs": knn_every, "knn_s": knn, "knn_images": knn_monitor.describe() if knn_monitor else None,
        "knn_share_pct": 100 * knn / (between + knn) if knn and between else None,
        "knn_top1": top1 if knn_times else None,
        "rank_every_epochs": rank_every, "rank_s": rank, "rank_images": rank_monitor.images if rank_monitor else None,
        "rank_share_pct": 100 * rank / (rank_between + rank) if rank and rank_between else None,
        "rank_share_at_imagenet_pct": 100 * rank / (1_281_167 // spec.optim.batch_size * step) if rank else None,
        **ranked,
    }
    print(f"monitor cost on {device} ({result['cpus']} cpus, {result['threads']} threads, load {load[0]:.1f}), "
          f"{spec.model.arch} width {spec.model.width}, {spec.data.image_size} px, batch {spec.optim.batch_size}:")
    print(f"  step {result['step_ms']:.1f} ms; with the probe {result['step_with_probe_ms']:.1f} ms")
    print(f"  probe step {result['probe_step_ms']:.2f} ms = {result['probe_share_pct']:.2f} % of a step "
          f"(difference of medians: {result['probe_share_by_difference_pct']:+.2f} %)")
    if knn:
        print(f"  kNN {knn:.2f} s ({result['knn_images']}) every {knn_every} epochs of {run.steps_per_epoch} steps "
              f"= {result['knn_share_pct']:.2f} % of training time")
    if rank:
        print(f"  rank monitor {rank:.2f} s ({rank_monitor.describe()}) every {rank_every} epoch(s) of "
              f"{run.steps_per_epoch} steps = {result['rank_share_pct']:.2f} % of training time; an epoch of "
              f"ImageNet's 1,281,167 images at this step time: {result['rank_share_at_imagenet_pct']:.4f} %")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
