"""`python -m barlow.torchrun ARGS`: torchrun (same arguments, same PET_* environment) with exit codes that keep
their meaning. Plain torchrun exits 1 for every failure, so a preempted pod (SIGTERM, checkpoint written)
would look permanent to `restartPolicy: ExitCode`; here the workers' code, or 128 + signal, comes through.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from barlow.errors import EXIT_OK, EXIT_PEER_LOST, child_exit_code, exit_on_signal


class _ExplainedFailures(logging.Filter):
    """Drops torch elastic's `failed (exitcode: N) local_rank: ...` block for a worker that exited with a code of its
    own (N > 0): the worker already printed why (its one `error:` line, or its traceback). A worker killed by a signal
    (N < 0) printed nothing, so that block stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        code = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (str(record.msg).startswith("failed (exitcode:") and isinstance(code, int) and code > 0)


def exit_code(argv: list[str]) -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    # LOGLEVEL as torchrun's own loggers take it (a local run quiets them: they repeat what a failed process said)
    logging.getLogger("torch.distributed.elastic").setLevel(os.environ.get("LOGLEVEL", "WARNING"))
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_ExplainedFailures())
    try:
        run(parse_args(argv))
    except (RendezvousError, DistError) as e:  # e.g. the master pod is not scheduled yet: try again later
        print(f"error: rendezvous failed ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return EXIT_PEER_LOST
    except SignalException as e:  # this launcher was told to stop; workers got the signal and checkpointed
        return exit_on_signal(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        return child_exit_code(failure.exitcode)
    return EXIT_OK


def as_init(argv: list[str]) -> int:
    """Run as a container's PID 1 (a pod's `command`, no init in front): torchrun in a child, stop signals passed on.
    The kernel drops a signal PID 1 has no handler for, and torchrun installs none before its rendezvous: a pod
    waiting for peers that never come sat out its whole grace period until SIGKILL. The child, not PID 1, dies of
    the signal at once (143, retryable) or, once training, checkpoints and exits 143 itself."""
    child = subprocess.Popen([sys.executable, "-m", "barlow.torchrun", *argv])
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: child.send_signal(signum))
    return child_exit_code(child.wait())


def _exit(code: int) -> None:
    """Exit with `code` without the interpreter's teardown, once torchrun is done: after a SIGTERM its rendezvous
    store is left running (torch keeps it for a restart), and its teardown was seen to abort the process ("terminate
    called without an active exception", 1 test run in about 25), turning a clean 143 into a crash."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(as_init(sys.argv[1:]) if os.getpid() == 1 else exit_code(sys.argv[1:]))
