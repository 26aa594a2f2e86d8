"""What a run reports: JSON lines, TensorBoard events, a progress bar with ETA, the cross-correlation heatmap, and
every line also to an experiment tracker when one is given (barlow.tracking).

Only the main rank writes. Files are written in a local folder and, for a remote output URL, copied there by
`sync()` (object stores cannot append; only files changed since the last sync are uploaded), so
`<output>/metrics.jsonl` and `<output>/tensorboard/` appear beside the checkpoints.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from barlow import storage, trainer_status

CORRUPT_KEY = "corrupt_images"  # undecodable images skipped so far in this attempt, all ranks
STOPPED_KEY = "stopped_by_signal"  # the last line of an attempt stopped by a signal
# shown on the progress line, with the keys a run adds (its monitors'); top1 and knn_top1 are the eval's results
PROGRESS_KEYS = ("epoch", "loss", "lr", "images_per_s", "top1", "knn_top1")


class Metrics:
    """Per-step scalars to metrics.jsonl and TensorBoard, and a progress display, on the main rank only."""

    def __init__(self, output_url: str, enabled: bool, total_steps: int, start_step: int = 0, title: str = "pretrain",
                 s3: storage.S3Settings | None = None, tracker: Any = None, progress_keys: tuple[str, ...] = ()):
        self.output_url, self.enabled, self.s3 = output_url, enabled, s3
        self.progress_keys = PROGRESS_KEYS + tuple(k for k in progress_keys if k not in PROGRESS_KEYS)
        self.tracker = tracker if enabled else None  # anything with log(step, values), log_artifact(name, data), close()
        self.console = Console(stderr=False)
        self._progress = None
        self._synced: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime) when last uploaded
        self.reporter: trainer_status.Reporter | None = None  # Kubeflow Trainer's status server, where it gives one
        if not enabled:
            return
        self.reporter = trainer_status.from_env(total_steps, start_step, say=self.print)
        self.local = output_url.removeprefix("file://") if storage.is_local(output_url) else tempfile.mkdtemp(prefix="barlow-")
        os.makedirs(self.local, exist_ok=True)
        if not storage.is_local(output_url) and storage.exists(storage.join(output_url, "metrics.jsonl"), s3):
            with open(os.path.join(self.local, "metrics.jsonl"), "wb") as f:  # keep the lines of earlier attempts
                f.write(storage.read_bytes(storage.join(output_url, "metrics.jsonl"), s3))
        self._jsonl = open(os.path.join(self.local, "metrics.jsonl"), "a")
        # the attempt's start line: what `barlow status` measures goodput from (barlow.goodput)
        self._jsonl.write(json.dumps({"step": start_step, "time": round(time.time(), 3),
                                      "attempt_started": round(process_started(), 3)}) + "\n")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(os.path.join(self.local, "tensorboard"), purge_step=start_step or None)
        if sys.stdout.isatty():  # a live bar in a terminal; plain lines in pod logs and CI
            self._progress = Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
            self._task = self._progress.add_task(title, total=total_steps, completed=start_step, info="")
            self._progress.start()

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _round(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)
        if self.tracker is not None:
            self.tracker.log(step, values)
        if self.reporter is not None:
            self.reporter.update(step, values)
        info = "  ".join(f"{k} {_short(v)}" for k, v in values.items() if k in self.progress_keys)
        if values.get(CORRUPT_KEY):  # shown once there are some: a healthy run's line stays short
            info += f"  corrupt images skipped {int(values[CORRUPT_KEY])}"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        elif any(k in self.progress_keys and k != "epoch" for k in values) or values.get(CORRUPT_KEY):  # else nothing to show
            self.console.print(f"step {step}  {info}", highlight=False, soft_wrap=True)

    def stopped(self, step: int, signum: int) -> None:
        """The line that says the run stopped on a signal at `step` (after its checkpoint): `barlow status` reads it."""
        if self.enabled:
            self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), STOPPED_KEY: signum}) + "\n")

    def advance(self, step: int) -> None:
        if self.reporter is not None:
            self.reporter.update(step)
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def print(self, message: str) -> None:
        if self.enabled:
            (self._progress.console if self._progress else self.console).print(message, highlight=False, soft_wrap=True)

    def sync(self) -> list[str]:
        """Copy the local files that changed since the last sync to a remote output URL; returns their relative
        paths (none for local output). Event files and metrics.jsonl only grow, so size + mtime tell a change."""
        if not self.enabled:
            return []
        self._jsonl.flush()
        self._tb.flush()
        if storage.is_local(self.output_url):
            return []
        fs, path = storage.filesystem(self.output_url, self.s3)
        changed = []
        for folder, _, names in os.walk(self.local):
            for name in names:
                local = os.path.join(folder, name)
                stat = os.stat(local)
                rel = os.path.relpath(local, self.local)
                if self._synced.get(rel) != (stat.st_size, stat.st_mtime_ns):
                    storage.retry(fs.put_file, local, path.rstrip("/") + "/" + rel.replace(os.sep, "/"), what=self.output_url,
                                  s3=self.s3)
                    self._synced[rel] = (stat.st_size, stat.st_mtime_ns)
                    changed.append(rel)
        return sorted(changed)

    def close(self, status: str = "FINISHED") -> None:
        """`status`: the tracker's end state of the run (FINISHED, KILLED when stopped by a signal to resume later)."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        self.sync()
        self._tb.close()
        self._jsonl.close()
        if self.tracker is not None:
            self.tracker.close(status)
        if self.reporter is not None:
            self.reporter.close(finished=status == "FINISHED")


def process_started() -> float:
    """When this process began (seconds since the epoch), from Linux's /proc; now where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def _round(v: Any) -> Any:
    return round(float(v), 6) if isinstance(v, float | int | torch.Tensor) else v


def _short(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def save_heatmap(c: torch.Tensor, url: str, max_dims: int = 128, s3: storage.S3Settings | None = None) -> None:
    """A PNG of the cross-correlation matrix's top-left block: Barlow Twins drives it toward the identity."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    block = c[:max_dims, :max_dims].float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(5, 4.4), dpi=120)
    im = ax.imshow(block, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_title(f"cross-correlation C (first {block.shape[0]} of {c.shape[0]} dims)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(url, buf.getvalue(), s3)
