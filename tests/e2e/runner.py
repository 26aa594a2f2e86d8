"""Helpers for end-to-end runs: a tiny spec that trains in seconds on the CPU, and the CLI in a fresh process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from barlow.spec import set_path


def tiny_spec(demo: Path, out: Path, **overrides) -> dict:
    """A narrow ResNet-18 at 16 px: a few seconds an epoch on two CPU processes."""
    spec = {
        "kind": "pretrain", "name": "tiny",
        "data": {"train": str(demo / "train"), "val": str(demo / "val"), "image_size": 16, "workers": 0},
        "model": {"arch": "resnet18", "small_images": True, "width": 8, "projector": "128-128-128"},
        "optim": {"epochs": 3, "batch_size": 128, "warmup_epochs": 1},
        "runtime": {"nproc_per_node": 2, "device": "cpu", "log_every": 2, "seed": 7},
        "output": {"url": str(out), "checkpoint_every": 4, "keep": 2},
        "eval": {"epochs": 6, "batch_size": 128, "lr_head": 0.5},
    }
    for path, value in overrides.items():
        spec = set_path(spec, path, value)
    return spec


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / f"{spec['name']}-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def barlow(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed CLI in a fresh process, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "barlow.cli", *args], capture_output=True, text=True, env=env,
                          timeout=kwargs.pop("timeout", 600), **kwargs)


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process and all its descendants (torchrun puts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def kill_after_first_checkpoint(spec_path: Path, out: Path) -> int:
    """Start `barlow run pretrain SPEC`, SIGKILL every process of it once it has a checkpoint in `out`; that
    checkpoint's step."""
    from barlow import checkpoint

    proc = subprocess.Popen([sys.executable, "-m", "barlow.cli", "run", "pretrain", str(spec_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while checkpoint.latest(str(out)) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    kill_tree(proc.pid, signal.SIGKILL)
    proc.wait()
    return checkpoint.load(checkpoint.latest(str(out)))["step"]
