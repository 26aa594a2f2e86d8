"""Exit codes that Kubernetes' `restartPolicy: ExitCode` acts on: 1-127 permanent, >= 128 retried."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_worker_pod_whose_master_never_comes_is_retryable():
    # What a Worker pod runs when the Master pod is not scheduled yet: the rendezvous times out.
    cmd = [sys.executable, "-m", "barlow.torchrun", "--nnodes=2", "--node-rank=1", "--nproc-per-node=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "--rdzv-conf=timeout=3", "-m", "barlow.entrypoint"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 144, result.stderr[-2000:]
    assert "rendezvous failed" in result.stderr


@pytest.mark.parametrize("spec_text, code, fragment", [
    ("kind: pretrain\nname: x\n", 2, "data: required field is missing"),
    ("kind: [", 2, "not valid YAML"),
])
def test_entrypoint_rejects_a_bad_spec_permanently(spec_text, code, fragment):
    env = {**os.environ, "BARLOW_SPEC": spec_text}
    result = subprocess.run([sys.executable, "-m", "barlow.entrypoint"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == code and fragment in result.stderr
