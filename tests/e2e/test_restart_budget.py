"""The restart budget with real processes: the entrypoint, as rank 0 of a pod, fails retryably (its rendezvous
port is taken: a DistNetworkError, exit 144) until cluster.max_restarts is spent; then it exits permanently with
one line saying why, on local files and on the real S3 server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from runner import tiny_spec, write_spec

from barlow import storage

pytestmark = pytest.mark.slow
MAX_RESTARTS = 2


def _attempt(spec_path, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PET_NNODES": "1",  # what the operator sets in its pods: the budget applies
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return subprocess.run([sys.executable, "-m", "barlow.entrypoint", str(spec_path)], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_retryable_failures_without_progress_end_permanently(where, demo_data, tmp_path, request):
    out = str(tmp_path / "run") if where == "local" else f"{request.getfixturevalue('s3').url}/run"
    overrides = {"cluster.max_restarts": MAX_RESTARTS}
    if where == "s3":
        overrides["data.s3"] = {"endpoint_url": request.getfixturevalue("s3").server.endpoint_url}
    spec_path = write_spec(tmp_path, tiny_spec(demo_data, out, **overrides))
    with socket.socket() as taken:  # the rendezvous port is in use: rank 0 cannot listen on it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        codes = []
        for _ in range(MAX_RESTARTS + 1):
            result = _attempt(spec_path, taken.getsockname()[1])
            codes.append(result.returncode)
    assert codes == [144] * MAX_RESTARTS + [1], result.stderr[-2000:]
    why = [line for line in result.stderr.splitlines() if "restart budget spent" in line]
    assert why == [f"error (rank 0): restart budget spent: {MAX_RESTARTS + 1} retryable failures in a row and no "
                   f"checkpoint yet (cluster.max_restarts {MAX_RESTARTS}); exiting permanently. Attempts are in "
                   f"{out}/attempts (delete that folder to reset the budget)"]
    records = [json.loads(storage.read_text(f"{out}/attempts/{n}")) for n in storage.list_names(f"{out}/attempts")]
    assert [(r["attempt"], r["code"], r["exit"]) for r in records] == [(1, 144, 144), (2, 144, 144), (3, 144, 1)]
