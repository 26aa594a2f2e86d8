"""How far a run is, how fast it goes and whether it looks healthy, read from its own files in `output.url`;
`record_run` writes `run.json`, the one of them written for status alone.

The files: `run.json` (what the run set out to do: total steps, global batch, restart budget; written by the main
rank at the start of every attempt), `metrics.jsonl` (one line per log step), the checkpoints folder (the latest
complete one and when its marker was written), `attempts/` (the restart record, barlow.restarts) and the file a run
writes last (`summary.json` after pretraining, `results.json` after an eval). The same reads work on a local folder
and on S3. No torch here: reading a run's progress needs fsspec (s3fs for s3://), not the training stack.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from barlow import checkpoint, goodput, restarts, storage
from barlow.spec import RunSpec

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"  # as barlow.metrics writes it
DONE_FILES = ("summary.json", "results.json")  # the last file of pretraining (train.finish) and of an eval
PROBE_KEYS = ("probe_top1",)  # the online linear probe's running top-1, where the run logs one
KNN_KEYS = ("knn_top1",)  # the periodic kNN monitor's top-1 (and the eval's final kNN)
RANK_KEYS = ("rankme_features", "rankme_projector", "constant_dims", "collapse_below")  # the rank monitor's
OWN_ROWS = PROBE_KEYS + KNN_KEYS + RANK_KEYS  # monitor keys with a field and a status row of their own
MONITOR_KEYS = "monitor_keys"  # run.json: the keys the run's monitors report; any without a row of its own gets one
STEP_KEY = "loss"  # the lines of training steps carry it; a kNN line or an eval's result line does not
TAIL_BYTES = 1 << 20  # the end of metrics.jsonl that is read: thousands of lines, far more than the rate needs
RATE_WINDOW = 20  # log lines the step rate is measured over
STALL_INTERVALS, STALL_MIN_S = 10, 600.0  # no new line for 10 log intervals, and 10 minutes at least: stalled

STOPPED_KEY = "stopped_by_signal"  # the line barlow.metrics writes last when a signal stopped the run
CORRUPT_KEY = "corrupt_images"  # per step line: undecodable images skipped so far in that attempt

NOT_STARTED, RUNNING, FINISHED, STALLED, STOPPED = "not started", "running", "finished", "stalled", "stopped"


def record_run(spec: RunSpec, total_steps: int, steps_per_epoch: int, batch_size: int,
               s3: storage.S3Settings | None = None, monitor_keys: Sequence[str] = ()) -> None:
    """Write `run.json`: what `status` needs that the metrics do not say (main rank, at the start of an attempt);
    `monitor_keys`: the metric keys the run's monitors report, which status shows whatever they are."""
    record = {"name": spec.name, "kind": spec.kind, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
              "epochs": total_steps // steps_per_epoch if steps_per_epoch else None, "batch_size": batch_size,
              "max_restarts": spec.cluster.max_restarts, "spec_hash": spec.spec_hash(),
              **({MONITOR_KEYS: list(monitor_keys)} if monitor_keys else {})}
    storage.write_text(storage.join(spec.output.url, RUN_FILE), json.dumps(record, indent=2) + "\n", s3)


@dataclass(frozen=True)
class Checkpoint:
    name: str  # step-NNNNNNNN
    step: int
    age_s: float | None  # seconds since its completion marker was written (None: the store gives no time)


@dataclass(frozen=True)
class Restarts:
    used: int  # retryable failures in a row since the latest checkpoint (barlow.restarts)
    max: int | None  # cluster.max_restarts (None: unknown)
    attempts: int  # every attempt recorded


@dataclass
class Progress:
    """A run's progress as `barlow status` shows it (and prints with `-o json`: these field names are the schema)."""

    output: str
    state: str  # not started | running | finished | stalled
    name: str | None = None
    kind: str | None = None
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    epochs: int | None = None
    loss: float | None = None
    probe_top1: float | None = None
    knn_top1: float | None = None
    rankme_features: float | None = None  # the label-free rank monitor's latest (barlow.monitors.rank)
    rankme_projector: float | None = None
    constant_dims: float | None = None
    collapse_below: float | None = None
    images_per_s: float | None = None
    steps_per_s: float | None = None
    eta_s: float | None = None
    updated_age_s: float | None = None  # seconds since the latest metrics line
    checkpoint: Checkpoint | None = None
    restarts: Restarts | None = None
    stopped_by_signal: int | None = None  # state stopped: the signal (15 SIGTERM, 2 Ctrl-C)
    corrupt_images: int | None = None  # undecodable images skipped, every attempt in the metrics read
    goodput: dict[str, Any] | None = None  # barlow.goodput's breakdown of the wall time, with its percent
    warnings: list[str] = field(default_factory=list)
    monitors: dict[str, float] = field(default_factory=dict)  # the latest of each run.json monitor_keys without a row

    @property
    def healthy(self) -> bool:
        return not self.warnings

    def as_dict(self) -> dict[str, Any]:
        found = {**asdict(self), "healthy": self.healthy}
        if not self.monitors:  # a field added within the schema's version: absent where the run declares no keys
            del found["monitors"]
        return found


def read(output_url: str, max_restarts: int | None = None, now: float | None = None) -> Progress:
    """The progress of the run in `output_url` (S3 with the storage's current settings). `max_restarts` (from a
    spec) wins over the run's own record. Raises FileNotFoundError for a local folder that does not exist."""
    now = time.time() if now is None else now
    if storage.is_local(output_url) and not os.path.isdir(output_url.removeprefix("file://")):
        raise FileNotFoundError(f"{output_url}: no such output folder")
    p = Progress(output_url, NOT_STARTED)
    run = _json(storage.join(output_url, RUN_FILE), p)
    p.name, p.kind = run.get("name"), run.get("kind")
    p.total_steps, p.epochs = run.get("total_steps"), run.get("epochs")
    rows = [r for r in _tail_rows(storage.join(output_url, METRICS_FILE)) if goodput.START_KEY not in r]  # steps only
    finished = any(storage.exists(storage.join(output_url, n)) for n in DONE_FILES)
    stop = rows.pop() if rows and STOPPED_KEY in rows[-1] else None  # a resumed run writes step lines after it
    if rows:
        _from_metrics(p, rows, run.get("batch_size"), now)
        _monitors(p, rows, run.get(MONITOR_KEYS))
    p.checkpoint = _checkpoint(output_url, now)
    if rows:
        found = goodput.of_rows(_all_rows(storage.join(output_url, METRICS_FILE)))
        p.goodput = found.as_dict() if found else None
    p.restarts = _restarts(output_url, max_restarts if max_restarts is not None else run.get("max_restarts"))
    if finished:
        p.state, p.eta_s = FINISHED, None
    elif stop is not None:
        p.state, p.eta_s, p.stopped_by_signal = STOPPED, None, stop[STOPPED_KEY]
    elif rows:
        p.state = _running_or_stalled(p, rows)
    _health(p)
    return p


def _json(url: str, p: Progress) -> dict[str, Any]:
    if not storage.exists(url):
        return {}
    try:
        found = json.loads(storage.read_text(url))
    except ValueError as e:
        p.warnings.append(f"{url}: unreadable ({e})")
        return {}
    return found if isinstance(found, dict) else {}


def _tail_rows(url: str) -> list[dict[str, Any]]:
    """The metrics lines at the end of the file, oldest first; a line cut short (being written) is skipped."""
    if not storage.exists(url):
        return []
    size = storage.size(url)
    start = max(0, size - TAIL_BYTES)
    text = storage.read_range(url, start, size).decode("utf-8", errors="replace") if size else ""
    lines = text.splitlines()[1 if start else 0:]  # a tail starts inside a line
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _all_rows(url: str) -> list[dict[str, Any]]:
    """Every metrics line (goodput needs each attempt's start, not only the tail)."""
    rows = []
    for line in storage.read_text(url).splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _latest(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> float | None:
    for row in reversed(rows):
        for k in keys:
            if isinstance(row.get(k), int | float):
                return float(row[k])
    return None


def _attempt(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The step lines of the current attempt: a resumed run starts again from its checkpoint's step."""
    rows = [r for r in rows if STEP_KEY in r and isinstance(r.get("time"), int | float)]
    start = 0
    for i in range(1, len(rows)):
        if rows[i]["step"] <= rows[i - 1]["step"]:
            start = i
    return rows[start:]


def _from_metrics(p: Progress, rows: list[dict[str, Any]], batch_size: int | None, now: float) -> None:
    last = rows[-1]
    p.step = last["step"]
    p.epoch = float(last["epoch"]) if isinstance(last.get("epoch"), int | float) else None
    p.loss = _latest(rows, ("loss",))
    p.probe_top1, p.knn_top1 = _latest(rows, PROBE_KEYS), _latest(rows, KNN_KEYS)
    p.images_per_s = _latest(rows, ("images_per_s",))
    for key in RANK_KEYS:
        setattr(p, key, _latest(rows, (key,)))
    if isinstance(last.get("time"), int | float):
        p.updated_age_s = max(0.0, now - float(last["time"]))
    p.corrupt_images = _corrupt(rows)
    window = _attempt(rows)[-RATE_WINDOW:]
    if len(window) >= 2 and window[-1]["time"] > window[0]["time"]:
        p.steps_per_s = (window[-1]["step"] - window[0]["step"]) / (window[-1]["time"] - window[0]["time"])
    elif p.images_per_s and batch_size:
        p.steps_per_s = p.images_per_s / batch_size
    if p.total_steps is not None and p.steps_per_s:
        p.eta_s = max(0, p.total_steps - p.step) / p.steps_per_s


def _monitors(p: Progress, rows: list[dict[str, Any]], keys: Any) -> None:
    """The latest value of each key the run's monitors report (run.json) that has no field of its own."""
    for key in keys if isinstance(keys, list) else []:
        if isinstance(key, str) and key not in OWN_ROWS:
            value = _latest(rows, (key,))
            if value is not None:
                p.monitors[key] = value


def _corrupt(rows: list[dict[str, Any]]) -> int | None:
    """Corrupt images skipped: each attempt's count is cumulative, so the sum of each attempt's last count."""
    total, last, seen, previous_step = 0, 0, False, None
    for row in rows:
        if not isinstance(row.get(CORRUPT_KEY), int | float):
            continue
        if previous_step is not None and row["step"] <= previous_step:  # a new attempt starts counting again
            total, last = total + last, 0
        last, seen, previous_step = int(row[CORRUPT_KEY]), True, row["step"]
    return total + last if seen else None


def _running_or_stalled(p: Progress, rows: list[dict[str, Any]]) -> str:
    window = _attempt(rows)[-RATE_WINDOW:]
    if p.updated_age_s is None or len(window) < 2:
        return RUNNING
    interval = (window[-1]["time"] - window[0]["time"]) / (len(window) - 1)
    limit = max(STALL_INTERVALS * interval, STALL_MIN_S)
    if p.updated_age_s > limit:
        p.warnings.append(f"no metrics line for {duration(p.updated_age_s)} (one came every {duration(interval)}): "
                          "the run is stopped or stuck")
        return STALLED
    return RUNNING


def _modified(url: str) -> float | None:
    """When a file was last written (seconds since the epoch), where the store says."""
    fs, path = storage.filesystem(url)
    try:
        info = storage.retry(fs.info, path, what=url)
    except FileNotFoundError:
        return None
    stamp = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    return float(stamp) if isinstance(stamp, int | float) else None


def _checkpoint(output_url: str, now: float) -> Checkpoint | None:
    url = checkpoint.latest(output_url)
    if url is None:
        return None
    written = _modified(storage.join(url, storage.COMMIT_MARKER))
    return Checkpoint(url.rstrip("/").rsplit("/", 1)[-1], checkpoint.step_of(url),
                      None if written is None else max(0.0, now - written))


def _restarts(output_url: str, max_restarts: int | None) -> Restarts | None:
    """The restart record, where the run keeps one (runs started by a cluster's operator)."""
    budget = restarts.Budget.read(output_url, max_restarts if max_restarts is not None else 0)
    if not budget.records:
        return None
    return Restarts(budget.used(), max_restarts, len(budget.records))


def _health(p: Progress) -> None:
    if p.loss is not None and not math.isfinite(p.loss):
        p.warnings.append(f"loss is {p.loss} at step {p.step}: training diverged")
    if p.rankme_projector is not None and p.collapse_below is not None and p.rankme_projector < p.collapse_below:
        p.warnings.append(f"collapse: the projector output's effective rank (RankMe) is {p.rankme_projector:.1f}, below "
                          f"{p.collapse_below:.1f} (monitor.collapse_fraction of its largest possible value)")
    wait = (p.goodput or {}).get("data_wait")
    if wait is not None and wait > goodput.INPUT_BOUND and p.state != FINISHED:
        p.warnings.append(f"input-bound: the loop waits for data {100 * wait:.0f} % of its step time (data_wait); more "
                          "data.workers or faster storage would speed it up")
    r = p.restarts
    if r is not None and r.max is not None and r.used >= r.max and p.state != FINISHED:
        p.warnings.append(f"restart budget spent: {r.used} of cluster.max_restarts {r.max} restarts since the latest "
                          "checkpoint; the next retryable failure ends the run")


def duration(seconds: float) -> str:
    """3 d 4 h, 2 h 5 min, 4 min 10 s, 12 s."""
    s = int(round(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60), ("min", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // sub_size
            return f"{s // size} {unit}" + (f" {rest} {sub}" if rest else "")
    return f"{s} s"


def _number(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"


def lines(p: Progress, now: float | None = None) -> list[tuple[str, str]]:
    """(label, value) rows that `barlow status` prints for a run's files."""
    now = time.time() if now is None else now
    rows: list[tuple[str, str]] = [("output", p.output)]
    if p.name:
        rows.append(("run", f"{p.name} ({p.kind})" if p.kind else p.name))
    state = p.state
    if p.state == STOPPED and p.stopped_by_signal is not None:
        state += f" by signal {p.stopped_by_signal}" + (f" after {p.checkpoint.name}" if p.checkpoint else "") + \
            " (rerun the same spec to resume)"
    rows.append(("state", state if p.healthy else f"{state} (see warnings)"))
    if p.step is not None:
        of = f" / {p.total_steps} ({100 * p.step / p.total_steps:.1f} %)" if p.total_steps else ""
        epoch = f"   epoch {p.epoch:.2f}" + (f" of {p.epochs}" if p.epochs else "") if p.epoch is not None else ""
        rows.append(("step", f"{p.step}{of}{epoch}"))
    if p.loss is not None:
        rows.append(("loss", _number(p.loss)))
    if p.probe_top1 is not None:
        rows.append(("probe", f"top-1 {p.probe_top1:.1f} % (online linear probe)"))
    if p.knn_top1 is not None:
        rows.append(("kNN", f"top-1 {p.knn_top1:.1f} %"))
    if p.rankme_projector is not None:
        rows.append(("rank", f"RankMe {p.rankme_features:.1f} features, {p.rankme_projector:.1f} projector; "
                              f"{100 * (p.constant_dims or 0):.0f} % near-constant dims"))
    rows += [(key, _number(value)) for key, value in p.monitors.items()]
    if p.images_per_s is not None or p.steps_per_s is not None:
        speed = [f"{p.images_per_s:,.0f} images/s" if p.images_per_s is not None else "",
                 f"{p.steps_per_s:.3g} steps/s" if p.steps_per_s is not None else ""]
        rows.append(("speed", ", ".join(s for s in speed if s)))
    if p.corrupt_images:
        rows.append(("corrupt", f"{p.corrupt_images} undecodable images skipped (data.on_corrupt: skip)"))
    if p.eta_s is not None and p.state == RUNNING:
        at = datetime.fromtimestamp(now + p.eta_s, UTC).strftime("%Y-%m-%d %H:%M UTC")
        rows.append(("ETA", f"{duration(p.eta_s)} (about {at})"))
    if p.updated_age_s is not None:
        rows.append(("updated", f"{duration(p.updated_age_s)} ago"))
    if p.checkpoint is not None:
        age = f", {duration(p.checkpoint.age_s)} ago" if p.checkpoint.age_s is not None else ""
        rows.append(("checkpoint", f"{p.checkpoint.name}{age}"))
    elif p.state != NOT_STARTED:
        rows.append(("checkpoint", "none yet"))
    if p.restarts is not None:
        of = f" of {p.restarts.max}" if p.restarts.max is not None else ""
        rows.append(("restarts", f"{p.restarts.used}{of} since the latest checkpoint ({p.restarts.attempts} attempts)"))
    if p.goodput is not None:
        g = p.goodput
        lost = [(k, g[f"{k.replace(' ', '_')}_s"]) for k in ("restarts", "redone", "checkpoint stall", "data wait",
                                                              "startup")]
        where = ", ".join(f"{k} {duration(v)}" for k, v in lost if v >= 0.5)
        rows.append(("goodput", f"{g['percent']:.1f} % of {duration(g['wall_s'])} ({g['attempts']} attempt(s))"
                     + (f"; lost: {where}" if where else "")))
    rows += [("warning", w) for w in p.warnings]
    return rows
