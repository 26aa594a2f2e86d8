"""The old name of barlow.status.runfiles, kept for the `from barlow import progress` lines of train.py and
evaluate.py (progress.record_run); new code imports barlow.status.runfiles."""

from barlow.status.runfiles import record_run

__all__ = ["record_run"]
