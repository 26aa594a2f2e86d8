"""Quality benchmark: Barlow Twins on Fashion-MNIST for a fixed CPU wall-clock budget, then a linear probe.

    .venv/bin/python bench/quality.py               # 20 minutes of pretraining (default)
    .venv/bin/python bench/quality.py --minutes 2   # a quick end-to-end check

1. Fashion-MNIST (60k train / 10k test, 28x28 grayscale) from Debian's `dataset-fashion-mnist`, installed with
   apt-get when missing and possible, written once as an ImageNet-style folder of PNGs in a cache directory, so
   pretraining reads images through barlow's own data path.
2. Pretraining with barlow's runtime (`barlow run pretrain SPEC`: torchrun processes, as in a pod) of a narrow
   ResNet-18. The runtime has no time budget, so a short probe run measures images/s and the number of epochs is
   chosen so the whole warmup + cosine schedule ends inside the budget.
3. Linear probe: global-pooled features of the frozen exported backbone for 10k labelled training images
   (1000 per class) and the 10k test images, standardised, multinomial logistic regression (its C picked on a
   held-out part of the 10k labelled images), top-1 on the test set; beside the same network at random init and
   beside the raw pixels.

Prints a markdown table and writes it, with the settings and measurements, to a JSON file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from barlow.model import build_backbone
from barlow.spec import dump_spec, parse_spec

PACKAGE = "dataset-fashion-mnist"
IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ("0-tshirt", "1-trouser", "2-pullover", "3-dress", "4-coat", "5-sandal", "6-shirt", "7-sneaker", "8-bag",
           "9-boot")  # numbered so the sorted folder names keep the dataset's label order
PROBE_LABELLED_PER_CLASS = 1000
PROBE_CS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
SEED = 0
WARMUP_FRACTION = 0.1  # of the schedule, at most one epoch (the paper: 10 of 1000 epochs, for a far longer run)

# The pretraining recipe (what the paper leaves to the user, tuned for 28 px grayscale and a few CPU-minutes).
RECIPE = {
    "model": {"arch": "resnet18", "small_images": True, "width": 16, "projector": "2048-2048-2048"},
    # A few epochs, not 1000: a smaller batch gives more steps, a higher lr moves further (short runs: batch 256,
    # lr 0.2: 82.2 % after 120k images; batch 128: 80.8 % after 54k; batch 128, lr 0.6: 81.4 % after 47k).
    # LARS eta 0.02, not the paper's 0.001 (issue 10's runs: 80.6 -> 83.4 % after one epoch, 82.6 -> 86.0 % after
    # three); with peak lr 0.6 x 128/256 it moves a weight by 0.3 x 0.02 of its norm a step, as solo-learn's CIFAR recipe.
    "optim": {"batch_size": 128, "lr_weights": 0.6, "lr_biases": 0.0048, "weight_decay": 1.5e-6, "lambd": 5e-3,
              "lars_eta": 0.02},
    # Small grayscale images: larger minimum crop, mild blur (3 px kernel), less solarization.
    "augment": {"min_scale": 0.25, "flip_prob": 0.5, "jitter_prob": 0.8, "grayscale_prob": 0.0,
                "blur_prob": [0.5, 0.1], "solarize_prob": [0.0, 0.1]},
}


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- data

def ensure_package() -> Path:
    """The folder of the idx .gz files, installing the Debian package when missing and possible."""
    if all((IDX_DIR / f).exists() for pair in IDX_FILES.values() for f in pair):
        return IDX_DIR
    apt = shutil.which("apt-get")
    if os.geteuid() != 0 or apt is None:
        sys.exit(f"error: Fashion-MNIST not found in {IDX_DIR}; install the Debian package {PACKAGE} "
                 f"(sudo apt-get install -y {PACKAGE})")
    log(f"installing {PACKAGE} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = [apt, "install", "-y", "--no-install-recommends", PACKAGE]
    if subprocess.run(cmd, env=env).returncode != 0:  # a stale package list: refresh once, then retry
        subprocess.run([apt, "update"], env=env)
        if subprocess.run(cmd, env=env).returncode != 0:
            sys.exit(f"error: apt-get could not install {PACKAGE}")
    if not all((IDX_DIR / f).exists() for pair in IDX_FILES.values() for f in pair):
        sys.exit(f"error: {PACKAGE} is installed but its files are not in {IDX_DIR} (see dpkg -L {PACKAGE})")
    return IDX_DIR


def read_idx(path: Path) -> np.ndarray:
    """An idx file (big-endian header: magic with ndim in its last byte, then the dimensions) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(idx_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (read_idx(idx_dir / f) for f in IDX_FILES[split])
    return images, labels.astype(np.int64)


def export_folder(images: np.ndarray, labels: np.ndarray, root: Path) -> Path:
    """`root/<class>/<index>.png`, written once: a folder becomes visible (renamed into place) only when complete."""
    if root.is_dir():
        return root
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in CLASSES:
        (tmp / name).mkdir(parents=True)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img, mode="L").save(tmp / CLASSES[label] / f"{i:05d}.png")
    tmp.rename(root)
    return root


def labelled_subset(labels: np.ndarray, per_class: int, seed: int = SEED) -> np.ndarray:
    """A fixed per-class sample of the training images whose labels the probe may use."""
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                   for c in range(len(CLASSES))]))


# ---------------------------------------------------------------------------------------------------- pretraining

def pretrain_spec(name: str, train: Path, out: Path, epochs: int, nproc: int, workers: int, warmup: float,
                  checkpoint_every: int = 1_000_000) -> dict:
    return {
        "kind": "pretrain", "name": name,
        "data": {"train": str(train), "image_size": 28, "channels": 1, "workers": workers,
                 "augment": RECIPE["augment"]},
        "model": RECIPE["model"],
        "optim": {**RECIPE["optim"], "epochs": epochs, "warmup_epochs": warmup},
        "runtime": {"nproc_per_node": nproc, "device": "cpu", "seed": SEED, "log_every": 10},
        "output": {"url": str(out), "checkpoint_every": checkpoint_every, "keep": 1},
    }


def run_pretrain(spec_dict: dict, timeout_s: float) -> float:
    """Run a fresh pretraining (no resume) with `barlow run pretrain` in its own process group; returns wall seconds."""
    out = Path(spec_dict["output"]["url"])
    shutil.rmtree(out, ignore_errors=True)
    spec = parse_spec(spec_dict, "bench/quality.py")  # a bad recipe fails here, with barlow's own message
    spec_path = out.with_suffix(".yaml")
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(dump_spec(spec))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "barlow.cli", "run", "pretrain", str(spec_path)], start_new_session=True)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        sys.exit(f"error: pretraining '{spec.name}' ran past {timeout_s:.0f} s (the CPU is far slower than probed)")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the runtime checkpoints and exits; make sure nothing is left
        _stop(proc)
        raise
    if code != 0:
        sys.exit(f"error: pretraining '{spec.name}' exited with code {code}")
    return time.perf_counter() - start


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the run's process group (torchrun and its workers), SIGKILL what is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, 120), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def metrics_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def probe_throughput(train: Path, work: Path, nproc: int, workers: int, images: int, batch: int) -> dict:
    """Images/s of the real runtime on a subset of the training folder, and the time it spends outside the steps."""
    subset = epoch_folder(train, work / "probe-data", images)
    out = work / "probe"
    spec = pretrain_spec("quality-probe", subset, out, epochs=2, nproc=nproc, workers=workers, warmup=0)
    wall = run_pretrain(spec, timeout_s=900)
    rows = metrics_rows(out)
    first = next(r for r in rows if r["step"] >= images // batch)  # the second epoch: loader and model are warm
    steps = rows[-1]["step"]
    rate = (steps - first["step"]) * batch / (rows[-1]["time"] - first["time"])
    overhead = max(0.0, wall - steps * batch / rate)  # process start, data listing, loader start, export
    return {"images_per_s": rate, "wall_s": wall, "steps": steps, "overhead_s": overhead}


def plan(budget_s: float, probe: dict, n_train: int, margin: float, batch: int) -> tuple[int, int]:
    """(epochs, images per epoch) whose whole schedule fits the budget at the probed speed, minus a safety margin.

    The runtime counts whole epochs of its folder; a pass over 60k images takes minutes here, so the folder one
    epoch reads is sized to the budget: every training image once plus a random few again, or, for a budget
    under one pass, a random subset.
    """
    total = max(batch, (budget_s * (1 - margin) - probe["overhead_s"]) * probe["images_per_s"])
    epochs = max(1, int(total // n_train))
    return epochs, max(batch, int(total / epochs) // batch * batch)


def epoch_folder(train: Path, dest: Path, images: int) -> Path:
    """`dest/<class>/<name>` symlinks into the training folder: `images` of them, every image once before any repeats."""
    shutil.rmtree(dest, ignore_errors=True)
    files = sorted(train.glob("*/*.png"))
    rng = np.random.default_rng(SEED)
    chosen = list(rng.permutation(len(files))[:images])
    while len(chosen) < images:  # pad with a random sample of repeats
        chosen += list(rng.permutation(len(files))[: images - len(chosen)])
    seen: dict[int, int] = {}
    for i in chosen:
        seen[i] = seen.get(i, 0) + 1
        link = dest / files[i].parent.name / f"{files[i].stem}-{seen[i]}{files[i].suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(files[i])
    return dest


# ---------------------------------------------------------------------------------------------------- linear probe

@torch.no_grad()
def features(backbone: torch.nn.Module, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Global-pooled backbone features of uint8 images, normalised as barlow normalises 1-channel input."""
    backbone.eval()
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start:start + batch].copy()).float().div(255).sub(0.5).div(0.5).unsqueeze(1)
        out.append(backbone(x).float().numpy())
    return np.concatenate(out)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> dict:
    """Standardised features, multinomial logistic regression; C chosen on 20 % of the labelled images, then refit."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(x, y, c):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x, y)

    fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=0.2, stratify=train_y, random_state=SEED)
    val_acc = {c: fit(fit_x, fit_y, c).score(val_x, val_y) for c in PROBE_CS}
    best = max(val_acc, key=val_acc.get)
    top1 = 100 * fit(train_x, train_y, best).score(test_x, test_y)
    return {"top1": top1, "C": best, "val_top1_by_C": {str(c): round(100 * a, 2) for c, a in val_acc.items()}}


def backbone_from(state_path: Path | None) -> torch.nn.Module:
    m = RECIPE["model"]
    torch.manual_seed(SEED)
    net = build_backbone(m["arch"], small_images=m["small_images"], width=m["width"], in_channels=1)
    if state_path is not None:
        net.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    return net


# ---------------------------------------------------------------------------------------------------- main

def table(rows: list[dict]) -> str:
    lines = ["| method | top-1 (%) | pretrain minutes | images seen |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['top1']:.1f} | {r['pretrain_minutes']:.1f} | {r['images_seen']:,} |")
    return "\n".join(lines)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="Pretraining wall-clock budget (default 20).")
    p.add_argument("--nproc", type=int, default=2, choices=(1, 2), help="Training processes (default 2).")
    p.add_argument("--workers", type=int, default=1, help="Data-loader workers per process (default 1).")
    p.add_argument("--margin", type=float, default=0.05, help="Fraction of the budget kept free for CPU noise.")
    p.add_argument("--probe-images", type=int, default=5120, help="Images of the throughput probe (2 epochs).")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "barlow" / "fashion-mnist",
                   help="Where the PNG folders are written once and reused.")
    p.add_argument("--work", type=Path, default=Path("runs/bench-quality"), help="Pretraining outputs.")
    p.add_argument("--skip-baselines", action="store_true", help="Probe only the pretrained backbone (for tuning).")
    p.add_argument("--json", type=Path, default=None, help="Results file (default WORK/quality.json).")
    args = p.parse_args(argv)
    args.json = args.json or args.work / "quality.json"
    args.work = args.work.resolve()
    torch.set_num_threads(os.cpu_count() or 1)
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` / kill: stop the pretraining processes too
    load_before = os.getloadavg()

    idx_dir = ensure_package()
    (train_img, train_y), (test_img, test_y) = load_split(idx_dir, "train"), load_split(idx_dir, "test")
    log(f"Fashion-MNIST: {len(train_img)} train, {len(test_img)} test images; PNG folders in {args.cache}")
    train_dir = export_folder(train_img, train_y, args.cache / "train")
    export_folder(test_img, test_y, args.cache / "test")

    batch = RECIPE["optim"]["batch_size"]
    log(f"throughput probe: {args.probe_images} images x 2 epochs, {args.nproc} process(es)")
    probe = probe_throughput(train_dir, args.work, args.nproc, args.workers, args.probe_images, batch)
    budget_s = 60 * args.minutes
    epochs, per_epoch = plan(budget_s, probe, len(train_img), args.margin, batch)
    log(f"probe: {probe['images_per_s']:.0f} images/s, {probe['overhead_s']:.0f} s outside the steps "
        f"-> {epochs} epoch(s) of {per_epoch} images in {args.minutes:g} minutes")

    out = args.work / "pretrain"
    folder = epoch_folder(train_dir, args.work / "pretrain-data", per_epoch)
    warmup = min(1.0, WARMUP_FRACTION * epochs)
    spec = pretrain_spec("quality", folder, out, epochs, args.nproc, args.workers, warmup)
    wall = run_pretrain(spec, timeout_s=3 * budget_s + 600)
    steps = metrics_rows(out)[-1]["step"]
    summary = json.loads((out / "summary.json").read_text())
    log(f"pretrained {steps} steps in {wall / 60:.1f} minutes")

    labelled = labelled_subset(train_y, PROBE_LABELLED_PER_CLASS)
    probe_train_img, probe_train_y = train_img[labelled], train_y[labelled]
    rows = []
    methods = [("Barlow Twins (linear probe)", out / "backbone.pt", wall / 60, steps * batch),
               ("same network, random init (linear probe)", None, 0.0, 0)]
    for method, state, minutes, seen in methods[:1] if args.skip_baselines else methods:
        net = backbone_from(state)
        result = linear_probe(features(net, probe_train_img), probe_train_y, features(net, test_img), test_y)
        rows.append({"method": method, "pretrain_minutes": minutes, "images_seen": seen, **result})
        log(f"{method}: top-1 {result['top1']:.1f} % (C = {result['C']})")
    if not args.skip_baselines:
        flat = lambda a: a.reshape(len(a), -1).astype(np.float32) / 255  # noqa: E731
        result = linear_probe(flat(probe_train_img), probe_train_y, flat(test_img), test_y)
        rows.append({"method": "raw pixels (logistic regression)", "pretrain_minutes": 0.0, "images_seen": 0, **result})
        log(f"raw pixels: top-1 {result['top1']:.1f} % (C = {result['C']})")

    md = table(rows)
    print("\n" + md + "\n")
    report = {
        "table_markdown": md, "rows": rows, "budget_minutes": args.minutes, "pretrain_wall_s": wall,
        "epochs": epochs, "images_per_epoch": per_epoch, "warmup_epochs": warmup, "steps": steps, "probe": probe,
        "recipe": RECIPE, "nproc": args.nproc,
        "workers": args.workers, "labelled_train_images": len(labelled), "test_images": len(test_img),
        "cross_correlation": {k: summary.get(k) for k in ("on_diag_mean", "off_diag_abs_mean")},
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    log(f"results -> {args.json}; load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
