"""Run a spec on this machine: torchrun starts `runtime.nproc_per_node` processes of barlow.entrypoint,
exactly as the pods of a PyTorchJob do (the spec travels in BARLOW_SPEC)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from barlow.errors import child_exit_code
from barlow.lease import HOLDER_ENV, Lease, new_holder
from barlow.spec import SPEC_ENV, EvalRunSpec, PretrainSpec, dump_spec
from barlow.storage import S3Settings


def torchrun_command(nproc: int) -> list[str]:
    """The torchrun call for one node; --standalone picks a free rendezvous port on 127.0.0.1."""
    return [sys.executable, "-m", "barlow.torchrun", "--standalone", "--nnodes=1", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "-m", "barlow.entrypoint"]


def run_local(spec: PretrainSpec | EvalRunSpec, holder: str | None = None) -> int:
    """Run the spec to completion in local processes, holding output.url's lease as `holder` (raises OutputInUse while
    another run holds it); returns the exit code (see barlow.entrypoint; torchrun killed by a signal N gives 128 + N)."""
    if spec.runtime.nodes != 1:
        raise ValueError(f"runtime.nodes: a local run has 1 node, the spec asks for {spec.runtime.nodes}")
    holder = holder or new_holder()
    with Lease(spec.output.url, holder, S3Settings.of_spec(spec)):
        return _torchrun(spec, holder)


def _torchrun(spec: PretrainSpec | EvalRunSpec, holder: str) -> int:
    nproc = spec.runtime.nproc_per_node
    env = {**os.environ, SPEC_ENV: dump_spec(spec), HOLDER_ENV: holder}  # the workers hold the lease as this run
    if spec.runtime.device != "cuda":  # share the cores instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("LOGLEVEL", "CRITICAL")  # torchrun's own lines repeat what the failing process said in one line
    env["PYTHONSAFEPATH"] = "1"  # `python -m` would put the working directory first: a ./barlow there would shadow barlow
    proc = subprocess.Popen(torchrun_command(nproc), env=env)
    # torchrun forwards a signal to its workers (they checkpoint, then exit 128 + signal); pass SIGTERM on to it.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        while True:
            try:
                return child_exit_code(proc.wait())
            except KeyboardInterrupt:  # Ctrl-C reached torchrun too: wait while the workers checkpoint
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
