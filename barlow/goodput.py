"""Goodput: the share of a run's wall time that advanced training, and where the rest went, from its metrics.jsonl.

Every attempt writes a start line (`attempt_started`: when its process began, and the step it resumed at) before its
step lines (barlow.metrics); the step lines carry `checkpoint_stall_s` (time the loop stood still for checkpoints)
and `data_wait` (the share of their interval the loop waited for a batch). From those:

- wall: from the first attempt's start to the latest line;
- startup: the first attempt's start to its first step (imports, process group, data, model);
- restarts: from an attempt's last line to the next attempt's first step (the failure, rescheduling, start-up, the
  steps done after the last line that were lost);
- redone: steps a resumed attempt did again (from its checkpoint to the furthest step reached before), at its pace;
- checkpoint stalls and data wait, as logged; productive: what is left.

And how often to checkpoint so that the least is lost (Young/Daly), for `barlow plan` and
`output.checkpoint_every: auto`. No torch, no fsspec here: the CLI image imports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

START_KEY = "attempt_started"  # the start line's key: the process's start time (seconds since the epoch)
INPUT_BOUND = 0.10  # a run that waits for data over this share of its step time is input-bound

SNAPSHOT_BYTES_PER_S = 5e9  # stated: a snapshot's copy into host memory (pinned device-to-host, or a host memcpy)
UPLOAD_BYTES_PER_S = 200e6  # stated: one rank's upload to object storage


def young_daly_s(stall_s: float, mtbf_s: float, upload_s: float = 0.0) -> float:
    """The checkpoint interval that loses least (Young/Daly): sqrt(2 x save stall x mean time between failures), never
    shorter than one upload (at most one is in flight)."""
    return max((2 * stall_s * mtbf_s) ** 0.5, upload_s)


def interval_steps(state_bytes: int, step_s: float, node_mtbf_hours: float, nodes: int) -> int:
    """Young/Daly's interval in steps for a state of `state_bytes` (stall and upload at the stated bandwidths)."""
    interval = young_daly_s(state_bytes / SNAPSHOT_BYTES_PER_S, node_mtbf_hours * 3600 / nodes,
                            state_bytes / UPLOAD_BYTES_PER_S)
    return max(1, round(interval / step_s)) if step_s > 0 else 1


@dataclass(frozen=True)
class Goodput:
    wall_s: float
    productive_s: float
    startup_s: float
    restarts_s: float
    redone_s: float
    checkpoint_stall_s: float
    data_wait_s: float
    attempts: int
    data_wait: float | None  # the latest log lines' share of step time spent waiting for a batch

    @property
    def percent(self) -> float:
        return 100.0 * self.productive_s / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "percent": round(self.percent, 2)}


def of_rows(rows: list[dict[str, Any]]) -> Goodput | None:
    """The goodput of a run's metrics lines (oldest first); None without a start line (a run of an older barlow)."""
    attempts: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for row in rows:
        if isinstance(row.get(START_KEY), int | float):
            attempts.append((row, []))
        elif attempts and isinstance(row.get("time"), int | float):
            attempts[-1][1].append(row)
    if not attempts:
        return None
    startup = restarts = redone = stalls = waits = 0.0
    furthest, previous_end, end = 0, None, float(attempts[0][0][START_KEY])
    for n, (start, lines) in enumerate(attempts):
        began, resumed = float(start[START_KEY]), int(start.get("step", 0))
        steps = [r for r in lines if "loss" in r]
        stalls += sum(float(r.get("checkpoint_stall_s", 0.0)) for r in lines)
        if not steps:  # died before its first log line: all of it lost to the restart
            end = max(end, max((float(r["time"]) for r in lines), default=began))
            restarts += end - (previous_end if previous_end is not None else began)
            previous_end = end
            continue
        pace = _pace(steps, resumed)
        first_step_at = float(steps[0]["time"]) - (int(steps[0]["step"]) - resumed) * pace  # when training began
        lost_before = max(0.0, first_step_at - began)
        if n == 0:
            startup += lost_before
        else:
            restarts += max(0.0, first_step_at - (previous_end if previous_end is not None else began))
        redone += max(0, min(furthest, int(steps[-1]["step"])) - resumed) * pace
        t = first_step_at
        for r in steps:
            waits += float(r.get("data_wait", 0.0)) * max(0.0, float(r["time"]) - t)
            t = float(r["time"])
        furthest = max(furthest, int(steps[-1]["step"]))
        previous_end = end = max(float(r["time"]) for r in lines)
    wall = max(0.0, end - float(attempts[0][0][START_KEY]))
    productive = max(0.0, wall - startup - restarts - redone - stalls - waits)
    recent = [float(r["data_wait"]) for r in rows[-20:] if isinstance(r.get("data_wait"), int | float)]
    return Goodput(wall, productive, startup, restarts, redone, stalls, waits, len(attempts),
                   sum(recent) / len(recent) if recent else None)


def _pace(steps: list[dict[str, Any]], resumed: int) -> float:
    """Seconds per step of an attempt, from its log lines (checkpoint stalls and data waits included)."""
    if len(steps) >= 2 and steps[-1]["step"] > steps[0]["step"]:
        return (float(steps[-1]["time"]) - float(steps[0]["time"])) / (int(steps[-1]["step"]) - int(steps[0]["step"]))
    return 0.0
