"""What torchrun runs in every process, locally and in a pod: validate the spec again, run it, map the outcome
to an exit code that Kubernetes' `restartPolicy: ExitCode` understands.

Exit codes (defined in barlow.errors): 0 done; 1 permanent failure (bad data, a bug); 2 invalid spec (permanent);
128 + signal number when stopped by SIGTERM/SIGINT after writing a checkpoint (143, 130: retryable, the
next attempt resumes from that checkpoint); 134 when NCCL's watchdog aborted a stuck collective (SIGABRT, passed
on by barlow.torchrun; retryable); 144 when a peer process or node went away (retryable: it is what the surviving
pods see when one pod is preempted); 145 when object storage stayed unreachable (at the start, for up to
BARLOW_STORAGE_WAIT_S, 300 s by default; mid-run, past its retries) or a checkpoint upload failed (retryable).
The spec comes as a file path argument, or as YAML text in the environment variable BARLOW_SPEC (how a PyTorchJob
passes it). In a pod, `barlow.restarts` bounds the retryable
failures without progress (cluster.max_restarts).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import traceback

from barlow.errors import (
    EXIT_FAILED,
    EXIT_INVALID_SPEC,
    EXIT_OK,
    EXIT_PEER_LOST,
    EXIT_STORAGE_UNAVAILABLE,
    RunFailed,
    StoppedOnSignal,
    StorageUnavailable,
    exit_on_signal,
)

__all__ = ["EXIT_FAILED", "EXIT_INVALID_SPEC", "EXIT_OK", "EXIT_PEER_LOST", "main"]

STORAGE_WAIT_ENV, STORAGE_WAIT_S = "BARLOW_STORAGE_WAIT_S", 300.0  # how long a starting pod waits for object storage


class _StopFlag:
    """Remembers the first stop signal; the loop checkpoints at its next check (a step, or with several processes
    a log or checkpoint step) and exits with 128 + signum."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.signum = self.signum or signum

    def __call__(self) -> int | None:
        return self.signum

    def wait(self, seconds: float) -> int | None:
        """The stop signal, waiting up to `seconds` for one to arrive."""
        deadline = time.monotonic() + seconds
        while self.signum is None and time.monotonic() < deadline:
            time.sleep(0.05)  # a signal cuts the sleep short
        return self.signum


def _error(message: str) -> None:
    rank = os.environ.get("RANK", "0")
    print(f"error (rank {rank}): {message}", file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    print(f"warning (rank {os.environ.get('RANK', '0')}): {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from barlow.spec import SPEC_ENV, SpecError, load_spec, loads_spec

    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv:
            spec = load_spec(argv[0])
        elif SPEC_ENV in os.environ:
            spec = loads_spec(os.environ[SPEC_ENV], SPEC_ENV)
        else:
            raise SpecError([f"no spec: pass a spec file or set {SPEC_ENV}"])
    except SpecError as e:
        for line in _skew(e.problems) or e.problems:
            _error(line)
        return EXIT_INVALID_SPEC
    from barlow import restarts, storage

    s3 = storage.S3Settings.of_spec(spec)
    within = float(os.environ.get(STORAGE_WAIT_ENV, STORAGE_WAIT_S))
    if (down := storage.wait_until_reachable(spec.output.url, s3, within, _warn)) is not None:
        _error(f"{storage.endpoint(s3)} unreachable for {within:.0f} s ({type(down).__name__}); exiting "
               f"{EXIT_STORAGE_UNAVAILABLE} to be retried")
        return EXIT_STORAGE_UNAVAILABLE
    return restarts.bounded(spec, lambda: _leased(spec), _error)


def _leased(spec) -> int:
    """_run, with output.url's lease held by global rank 0 as the run's identity (the local `barlow run`, or the job);
    another run's fresh lease is one line and exit 1."""
    if os.environ.get("RANK", "0") != "0":
        return _run(spec)
    from barlow.lease import Lease, holder_here
    from barlow.storage import S3Settings

    try:
        lease = Lease(spec.output.url, holder_here(spec.name), S3Settings.of_spec(spec)).take()
    except (RunFailed, OSError) as e:
        _error(str(e))
        return EXIT_FAILED
    try:
        return _run(spec)
    finally:
        lease.release()


def _skew(problems: list[str]) -> list[str]:
    """One line naming both versions when a newer CLI rendered a spec with fields this image does not know."""
    from barlow import __version__
    from barlow.spec import RENDERED_BY_ENV

    rendered_by, unknown = os.environ.get(RENDERED_BY_ENV), [p.split(":")[0] for p in problems if "unknown field" in p]
    if not unknown or not rendered_by or rendered_by == __version__:
        return []
    return [f"this spec was rendered by barlow {rendered_by}, but the image runs barlow {__version__}, which does not "
            f"know {', '.join(unknown)}: build and push an image of barlow {rendered_by} (make image) or render with "
            f"barlow {__version__}"]


_PEER_FAILURE_GRACE_S = 5.0  # torchrun checks its processes every 0.1 s, then signals the rest
# how gloo reports a collective whose peer has gone: a RuntimeError, not a DistError
_PEER_GONE = re.compile(r"Connection (closed|reset) by peer|Broken pipe")


def _peer_lost(e: Exception) -> bool:
    import torch.distributed

    return isinstance(e, torch.distributed.DistError) or (isinstance(e, RuntimeError) and bool(_PEER_GONE.search(str(e))))


def worker_message(e: Exception) -> str:
    """The message of an error, or where a loader worker raised it (torch re-raises it in this process as "Caught X in
    DataLoader worker process N" and the worker's traceback), the worker's own message: one line, not a traceback."""
    text = str(e)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    name = re.escape(type(e).__name__)
    found = re.search(rf"^(?:[\w.]+\.)?{name}: (.*?)\s*\Z", text, re.MULTILINE | re.DOTALL)
    return found.group(1) if found else text.splitlines()[0]


def _run(spec) -> int:
    stop = _StopFlag()
    stop.install()
    from barlow.data.decode import CorruptImage

    try:
        if spec.kind == "pretrain":
            from barlow.train import pretrain

            pretrain(spec, stop)
        else:
            from barlow.evaluate import evaluate

            evaluate(spec, stop)
    except (StoppedOnSignal, StorageUnavailable) as e:
        _error(str(e))
        return e.exit_code
    except (RunFailed, CorruptImage, FileNotFoundError, PermissionError) as e:
        _error(worker_message(e))
        return EXIT_FAILED
    except Exception as e:
        from barlow import storage

        if storage.is_transient(e):  # storage down past its retries mid-run: the next attempt resumes
            _error(f"{storage.endpoint(storage.S3Settings.of_spec(spec))} unreachable past its retries "
                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); exiting {EXIT_STORAGE_UNAVAILABLE} "
                   "to be retried")
            return EXIT_STORAGE_UNAVAILABLE
        if not _peer_lost(e):
            traceback.print_exc()
            return EXIT_FAILED
        # Where another process of this node failed, torchrun stops this one within a moment: that one said why.
        local_peers = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1
        if local_peers and (signum := stop.wait(_PEER_FAILURE_GRACE_S)) is not None:
            return exit_on_signal(signum)
        # a peer on another node died, or the network failed: another attempt can succeed
        _error(f"lost contact with the other processes ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return EXIT_PEER_LOST
    finally:
        from barlow.distributed import teardown

        teardown()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
