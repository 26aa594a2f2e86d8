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


def test_object_storage_down_at_the_start_exits_retryably_with_one_line():
    # An operator's pod (PET_NNODES: the restart budget applies) whose output store is unreachable: it waits
    # BARLOW_STORAGE_WAIT_S, then one line naming the endpoint, no traceback, and 145 (retryable), not 1.
    endpoint = f"http://127.0.0.1:{free_port()}"
    spec = (f"kind: pretrain\nname: x\ndata:\n  train: s3://bucket/train\n  s3:\n    endpoint_url: {endpoint}\n"
            "output:\n  url: s3://bucket/run\nruntime:\n  device: cpu\n")
    env = {**os.environ, "BARLOW_SPEC": spec, "BARLOW_STORAGE_WAIT_S": "3", "PET_NNODES": "1", "RANK": "0",
           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    result = subprocess.run([sys.executable, "-m", "barlow.entrypoint"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 145, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and f"object storage at {endpoint} unreachable for 3 s" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
