"""The runtime's exceptions, named for what happened, and the exit codes they map to.

Exit codes follow Kubernetes' `restartPolicy: ExitCode`: 1-127 are permanent (a retry would fail the same way),
>= 128 are retried (the next attempt resumes from the latest complete checkpoint).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # permanent: bad data, a mismatched output folder, a bug
EXIT_INVALID_SPEC = 2  # permanent: the spec fails validation
EXIT_PEER_LOST = 144  # retryable: a peer process or node went away, or the rendezvous timed out


class RunFailed(Exception):
    """A permanent failure the message explains in one line (naming the field or file); exit 1."""

    exit_code = EXIT_FAILED


class TooFewImages(RunFailed):
    """The data cannot fill one global batch."""


class OutputHoldsAnotherRun(RunFailed):
    """output.url already holds checkpoints of a run with another model or global batch."""


class NothingToEvaluate(RunFailed):
    """eval.checkpoint / eval.backbone names no backbone, export or complete checkpoint."""


class BackboneMismatch(RunFailed):
    """The backbone weights do not fit model.*."""


class SplitsDisagree(RunFailed):
    """data.train and data.val have different classes."""


class WrongPlacement(RunFailed):
    """torchrun started another number of processes than the spec asks for, or the asked-for device is missing."""


class UnlabelledData(RunFailed):
    """Something that needs labels (monitor.online_probe: on) got data with one class."""


class MissingExtra(RunFailed):
    """The spec asks for a feature whose optional package is not installed (e.g. output.mlflow without mlflow)."""


class StoppedOnSignal(Exception):
    """A stop signal (SIGTERM, SIGINT) arrived and a checkpoint was written; the rerun resumes from it."""

    def __init__(self, signum: int, position: str):
        super().__init__(f"stopped by signal {signum} at {position}, after a checkpoint")
        self.signum, self.position = signum, position

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 143 for SIGTERM, 130 for SIGINT: retryable
