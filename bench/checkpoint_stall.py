"""What checkpoints to slow object storage cost a run: images/s with a checkpoint every few steps against the same
run with none, the output on the S3 test server (SeaweedFS, tests/support/s3server.py) behind a loopback link of
`--mb-per-s` (20 MB/s by default), so each upload takes seconds.

    .venv/bin/python bench/checkpoint_stall.py                 # 2 rounds of (no checkpoints | every 15 steps)
    .venv/bin/python bench/checkpoint_stall.py --rounds 1 --every 5

Each round runs the two side by side (the same share of a busy machine for both). Each run is `barlow run pretrain`
(torchrun, one CPU process) of a narrow ResNet-18 with a wide projector (a
checkpoint of about 75 MB, nearly 4 s at 20 MB/s) on the demo images at 16 px. images/s is
taken from its metrics.jsonl between its first and last log line (the final checkpoint, which waits for its upload
at the end of every run, falls outside). The checkpoint's size and the time one upload of it takes through the same
link are printed beside, with what a run that waited for every upload would have lost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))

from s3server import S3Server, SlowDownProxy  # noqa: E402

from barlow import checkpoint, storage  # noqa: E402


def spec(data: Path, out: str, endpoint: str, every: int, epochs: int) -> dict:
    return {
        "kind": "pretrain", "name": "bench-checkpoint",
        "data": {"train": str(data / "train"), "image_size": 16, "workers": 1, "s3": {"endpoint_url": endpoint}},
        "model": {"arch": "resnet18", "small_images": True, "width": 16, "projector": "2048-2048-2048"},
        "optim": {"epochs": epochs, "batch_size": 32, "warmup_epochs": 0},
        "runtime": {"nproc_per_node": 1, "device": "cpu", "log_every": 5, "seed": 7},
        "output": {"url": out, "checkpoint_every": every, "keep": 2},
        "monitor": {"online_probe": "off"},
    }


def start(tmp: Path, data: Path, out: str, endpoint: str, every: int, epochs: int, env: dict) -> subprocess.Popen:
    path = tmp / f"spec-{every}-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(spec(data, out, endpoint, every, epochs)))
    return subprocess.Popen([sys.executable, "-m", "barlow.cli", "run", "pretrain", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen, out: str, endpoint: str, every: int) -> dict:
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{stderr[-3000:]}")
    rows = [json.loads(line) for line in storage.read_text(storage.join(out, "metrics.jsonl"),
                                                           storage.S3Settings(endpoint_url=endpoint)).splitlines()]
    steps = [r for r in rows if "loss" in r]
    first, last = steps[0], steps[-1]
    stalls = [r["checkpoint_stall_s"] for r in steps if "checkpoint_stall_s" in r]  # the final one falls outside
    waits = [r["data_wait"] for r in steps if "data_wait" in r]
    return {"every": every, "images_per_s": (last["step"] - first["step"]) * 32 / (last["time"] - first["time"]),
            "measured_s": last["time"] - first["time"], "steps": last["step"], "checkpoint_stall_s": sum(stalls),
            "data_wait": sum(waits) / max(len(waits), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb-per-s", type=float, default=20.0, help="the link's bandwidth to object storage")
    ap.add_argument("--every", type=int, default=15, help="output.checkpoint_every of the checkpointed runs")
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the demo set per run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp_name, S3Server(Path(tmp_name) / "s3") as server:
        tmp = Path(tmp_name)
        env = {**os.environ, **server.env, "PYTHONUNBUFFERED": "1"}
        os.environ.update(server.env)
        subprocess.run([sys.executable, "-m", "barlow.cli", "data", "demo", str(tmp / "demo")], env=env, check=True,
                       capture_output=True)
        port = int(server.endpoint_url.rsplit(":", 1)[1])
        with SlowDownProxy(port, bytes_per_s=args.mb_per_s * 1e6) as proxy:
            results = []
            for r in range(args.rounds):
                # both at once: on a shared machine they get the same share of the CPUs, so load that comes and goes
                # falls on both alike (one after the other, it decides the result)
                runs = {every: (f"s3://{server.bucket}/bench-{r}-{every}",) for every in (10**7, args.every)}
                procs = {every: start(tmp, tmp / "demo", out, proxy.url, every, args.epochs, env)
                         for every, (out,) in runs.items()}
                for every, proc in procs.items():
                    results.append(result(proc, runs[every][0], proxy.url, every))
                    print(json.dumps(results[-1]), flush=True)
                out = runs[args.every][0]
            settings = storage.S3Settings(endpoint_url=proxy.url)
            latest = checkpoint.latest(out, settings)
            size = sum(storage.size(u, settings) for u in storage.find(latest, settings))
            state = checkpoint.load(latest, settings)
            started = time.monotonic()
            checkpoint.save(f"s3://{server.bucket}/bench-upload", 1, state, keep=1, s3=settings,
                            files={"backbone.pt": {k: v for k, v in state["model"].items() if k.startswith("backbone.")}})
            upload_s = time.monotonic() - started
    base = [r["images_per_s"] for r in results if r["every"] > args.every]
    ckpt = [r for r in results if r["every"] == args.every]
    mean_base = sum(base) / len(base)
    mean_ckpt = sum(r["images_per_s"] for r in ckpt) / len(ckpt)
    n_ckpt = ckpt[0]["steps"] // args.every
    summary = {"mb_per_s": args.mb_per_s, "checkpoint_mb": size / 1e6, "upload_s": upload_s,
               "images_per_s_without": mean_base, "images_per_s_with": mean_ckpt,
               "ratio": mean_ckpt / mean_base, "checkpoints_per_run": n_ckpt,
               "stall_s_per_run": sum(r["checkpoint_stall_s"] for r in ckpt) / len(ckpt),
               "waiting_for_every_upload_would_add_s": n_ckpt * upload_s, "runs": results}
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
