"""Goodput from a run's metrics lines: every second of wall time lands in exactly one place."""

from __future__ import annotations

import pytest

from barlow.goodput import of_rows

# attempt 1 starts at 0, trains from step 0 at 1 s/step from t=10 (10 s of start-up), logs steps 10 and 20 with 10 %
# data wait and a 1 s checkpoint stall, and dies after t=30; attempt 2 starts at 40, resumes at step 10 (its
# checkpoint), trains from t=50 and logs steps 20 and 30: 20 s lost between the attempts, steps 10-20 done again.
KILLED_ONCE = [
    {"step": 0, "time": 5, "attempt_started": 0},
    {"step": 10, "time": 20, "loss": 1.0, "data_wait": 0.1},
    {"step": 20, "time": 30, "loss": 0.9, "data_wait": 0.1, "checkpoint_stall_s": 1.0},
    {"step": 10, "time": 45, "attempt_started": 40},
    {"step": 20, "time": 60, "loss": 0.9},
    {"step": 30, "time": 70, "loss": 0.8},
]


@pytest.mark.parametrize("rows, want", [
    (KILLED_ONCE, {"wall_s": 70, "startup_s": 10, "restarts_s": 20, "redone_s": 10, "checkpoint_stall_s": 1,
                   "data_wait_s": 2, "productive_s": 27, "attempts": 2}),
    (KILLED_ONCE[:3], {"wall_s": 30, "startup_s": 10, "restarts_s": 0, "redone_s": 0, "checkpoint_stall_s": 1,
                       "data_wait_s": 2, "productive_s": 17, "attempts": 1}),
    # an attempt that died before its first log line: everything from the last line to the next first step is lost
    (KILLED_ONCE[:3] + [{"step": 20, "time": 36, "attempt_started": 35}] + [
        {"step": 20, "time": 45, "attempt_started": 40}, {"step": 30, "time": 60, "loss": 0.8},
        {"step": 40, "time": 70, "loss": 0.7}],
     {"wall_s": 70, "startup_s": 10, "restarts_s": 20, "redone_s": 0, "checkpoint_stall_s": 1, "data_wait_s": 2,
      "productive_s": 37, "attempts": 3}),
])
def test_where_the_wall_time_went(rows, want):
    g = of_rows(rows)
    got = {k: round(v, 6) for k, v in g.as_dict().items() if k in want}
    assert got == want
    assert g.percent == pytest.approx(100 * want["productive_s"] / want["wall_s"])


def test_a_run_of_an_older_barlow_has_no_goodput():
    assert of_rows([r for r in KILLED_ONCE if "attempt_started" not in r]) is None
