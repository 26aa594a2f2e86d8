"""The runtime's exceptions, named for what happened, and every exit code barlow uses (runtime, torchrun, the
restart budget, the CLI and the pipeline's follow-up Job).

Exit codes follow Kubernetes' `restartPolicy: ExitCode`: 1-127 are permanent (a retry would fail the same way),
>= 128 are retried (the next attempt resumes from the latest complete checkpoint).
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_FAILED = 1  # permanent: bad data, a mismatched output folder, a bug, a spent restart budget, a failed job
EXIT_INVALID_SPEC = 2  # permanent: the spec (or a CLI argument) fails validation
EXIT_UNREACHABLE = 3  # the CLI could not reach the Kubernetes API server: worth retrying (the follow-up Job does)
EXIT_WAIT_TIMEOUT = 124  # `barlow wait --timeout` gave up before the job finished (timeout(1)'s code)
RETRYABLE_FROM = 128  # restartPolicy: ExitCode retries codes >= 128; 1-127 fail the job
EXIT_WATCHDOG_ABORT = RETRYABLE_FROM + signal.SIGABRT  # 134, retryable: NCCL's watchdog aborted a stuck collective
EXIT_PEER_LOST = 144  # retryable: a peer process or node went away, or the rendezvous timed out
EXIT_STORAGE_UNAVAILABLE = 145  # retryable: object storage stayed unreachable past its retries (or a checkpoint upload failed)
FOLLOW_UP_PERMANENT = (EXIT_FAILED, EXIT_INVALID_SPEC)  # the follow-up Job fails at once on these, retries others


def exit_on_signal(signum: int) -> int:
    """The exit code of a process stopped by a signal: 128 + its number (143 SIGTERM, 130 SIGINT, 134 SIGABRT)."""
    return RETRYABLE_FROM + int(signum)


def child_exit_code(code: int) -> int:
    """A child process's return code as this process exits with it: a negative code is a child killed by that
    signal (-6, SIGABRT from NCCL's watchdog, gives 134; -9 gives 137), passed on as 128 + signal, as a shell does,
    so that it stays retryable."""
    return exit_on_signal(-code) if code < 0 else code


def is_retryable(code: int) -> bool:
    return code >= RETRYABLE_FROM


class RunFailed(Exception):
    """A permanent failure the message explains in one line (naming the field or file); exit 1."""

    exit_code = EXIT_FAILED


class TooFewImages(RunFailed):
    """The data cannot fill one global batch."""


class OutputHoldsAnotherRun(RunFailed):
    """output.url already holds checkpoints of a run with another model or global batch."""


class OutputInUse(RunFailed):
    """Another run holds output.url's lease (barlow.lease): two runs must not write one output folder."""


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
        return exit_on_signal(self.signum)  # 143 for SIGTERM, 130 for SIGINT: retryable


class StorageUnavailable(Exception):
    """Object storage stayed unreachable (or a checkpoint upload kept failing) past its retries: retryable, since a
    store that is down now is usually back by the next attempt, which resumes from the latest complete checkpoint."""

    exit_code = EXIT_STORAGE_UNAVAILABLE


class CheckpointUploadFailed(StorageUnavailable):
    """A checkpoint's background upload failed after its retries; the run stops rather than train on unsaved."""
