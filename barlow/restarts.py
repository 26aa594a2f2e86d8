"""The restart budget: a bound on `restartPolicy: ExitCode` restarts that make no progress.

The Kubeflow training operator (<= v1.9) does not count ExitCode retries against `backoffLimit`
(kubeflow/trainer#2045), so a pod that keeps failing with a retryable code (>= 128) is recreated forever. The
entrypoint of global rank 0 records every attempt as a small JSON object under `<output.url>/attempts/`; an attempt
that fails retryably while the latest complete checkpoint is still the one the previous such failures saw adds to a
streak, and a new checkpoint ends it. Past `cluster.max_restarts` restarts in a streak, the entrypoint exits with the
permanent code instead, with one line saying why. An attempt that never got to record its end (SIGKILL, OOM) counts
as a retryable failure. Deleting `<output.url>/attempts/` resets the budget.

It applies in pods a Kubeflow operator started (both the training operator v1 and Trainer v2's torch plugin set
PET_NNODES for torchrun there; a local `barlow run` does not): a local run is restarted by a person, who sees every
failure (see README "Exit codes").
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from barlow import checkpoint, storage
from barlow.errors import EXIT_FAILED as PERMANENT  # what a spent budget exits with
from barlow.errors import is_retryable
from barlow.spec import RunSpec

FOLDER = "attempts"


OPERATOR_ENV = "PET_NNODES"  # set for torchrun by the operator in every training pod, on either backend


def applies() -> bool:
    """In an operator's training pod, on global rank 0: one process keeps the record, so every attempt is counted
    once (the others see rank 0's permanent exit end the job)."""
    return bool(os.environ.get(OPERATOR_ENV)) and os.environ.get("RANK", "0") == "0"


def bounded(spec: RunSpec, run: Callable[[], int], say: Callable[[str], None]) -> int:
    """Run one attempt (`run` returns its exit code) within the spec's restart budget; returns the exit code."""
    if not applies():
        return run()
    try:
        budget = Budget.open(spec)
        why = budget.at_start()
    except (OSError, ValueError) as e:  # the record is a safeguard: an unreadable one must not stop the run
        say(f"restart budget unavailable ({type(e).__name__}: {e}); running without it")
        return run()
    if why:
        budget.at_end(PERMANENT)
        say(why)
        return PERMANENT
    code, why = budget.at_end(run())
    if why:
        say(why)
    return code


def _retryable(record: dict[str, Any]) -> bool:
    code = record.get("code")
    return code is None or is_retryable(code)  # no code: the attempt died without recording its end


@dataclass
class Budget:
    """The attempts of one run's output folder, read once at the start of this attempt."""

    output_url: str
    max_restarts: int
    records: list[dict[str, Any]] = field(default_factory=list)  # earlier attempts, oldest first
    started: dict[str, Any] | None = None  # this attempt's record
    s3: storage.S3Settings | None = None

    @classmethod
    def open(cls, spec: RunSpec) -> Budget:
        return cls.read(spec.output.url, spec.cluster.max_restarts, storage.S3Settings.of_spec(spec))

    @classmethod
    def read(cls, output_url: str, max_restarts: int, s3: storage.S3Settings | None = None) -> Budget:
        """The record under an output URL."""
        url = storage.join(output_url, FOLDER)
        names = sorted(n for n in storage.list_names(url, s3) if n.endswith(".json"))
        records = [json.loads(storage.read_text(storage.join(url, n), s3)) for n in names]
        return cls(output_url, max_restarts, records, s3=s3)

    def used(self) -> int:
        """Restarts spent of `max_restarts`: the retryable failures in a row since the latest complete checkpoint,
        the newest attempt not counted while it has no end (it may be running)."""
        ended = self.records[:-1] if self.records and "ended" not in self.records[-1] else self.records
        return Budget(self.output_url, self.max_restarts, ended, s3=self.s3)._streak(self._latest())

    def _latest(self) -> str | None:
        found = checkpoint.latest(self.output_url, self.s3)
        return found.rstrip("/").rsplit("/", 1)[-1] if found else None

    def _streak(self, latest: str | None) -> int:
        """Retryable failures at the end of the record, all with `latest` as the newest checkpoint."""
        n = 0
        for record in reversed(self.records):
            if not _retryable(record) or record.get("checkpoint") != latest:
                break
            n += 1
        return n

    def _why(self, streak: int, latest: str | None) -> str:
        since = f"since checkpoint {latest}" if latest else "and no checkpoint yet"
        return (f"restart budget spent: {streak} retryable failures in a row {since} (cluster.max_restarts "
                f"{self.max_restarts}); exiting permanently. Attempts are in {storage.join(self.output_url, FOLDER)} "
                "(delete that folder to reset the budget)")

    def at_start(self) -> str | None:
        """Why this attempt must not run (the budget is already spent), or None; records the attempt's start."""
        latest = self._latest()
        streak = self._streak(latest)
        self.started = {"attempt": len(self.records) + 1, "host": socket.gethostname(), "started": time.time(),
                        "checkpoint": latest, "code": None}
        self._write(self.started)
        return self._why(streak, latest) if streak > self.max_restarts else None

    def at_end(self, code: int) -> tuple[int, str | None]:
        """(the exit code to use, why it was changed or None), recording the attempt's end."""
        latest = self._latest()
        streak = self._streak(latest) + 1 if is_retryable(code) else 0
        why = self._why(streak, latest) if streak > self.max_restarts else None
        if self.started is not None:
            self._write({**self.started, "ended": time.time(), "checkpoint": latest, "code": code,
                         "exit": PERMANENT if why else code})
        return (PERMANENT if why else code), why

    def _write(self, record: dict[str, Any]) -> None:
        name = f"attempt-{record['attempt']:06d}.json"
        storage.write_text(storage.join(self.output_url, FOLDER, name), json.dumps(record, sort_keys=True) + "\n", self.s3)
