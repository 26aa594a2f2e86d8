"""One run at a time per output folder (barlow/lease.py): a second run is refused in one line while the first one's lease
is fresh; the same run's identity (torchrun's workers, a job's restarted pods) takes its lease over; a stale lease, or
one whose process on this machine is gone, is taken over; a lease is released at the end. Local folders and the real
S3 test server alike."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from barlow import lease, storage
from barlow.errors import OutputInUse
from barlow.lease import Lease


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run"), None
    place = request.getfixturevalue("s3")
    return f"{place.url}/run", place.settings


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_run_is_refused_while_the_first_holds_the_lease(output):
    url, s3 = output
    first = Lease(url, "run A", s3).take()
    with pytest.raises(OutputInUse) as e:
        Lease(url, "run B", s3).take()
    assert re.match(rf"output.url: {url} is in use by another run \(run A, last heartbeat [0-2] s ago\): wait", str(e.value))
    assert "\n" not in str(e.value)
    Lease(url, "run A", s3).take().release()  # the same run (its worker, its restarted pod): its own lease
    assert not storage.exists(f"{url}/{lease.LEASE_FILE}", s3)  # released by the last holder, as the run ends
    first.release()
    with Lease(url, "run B", s3):  # free again
        assert json.loads(storage.read_text(f"{url}/{lease.LEASE_FILE}", s3))["holder"] == "run B"
    assert not storage.exists(f"{url}/{lease.LEASE_FILE}", s3)


@pytest.mark.parametrize("stale", ["old-heartbeat", "process-gone"])
def test_a_stale_lease_is_taken_over(output, stale):
    url, s3 = output
    record = {"holder": "killed run", "host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
              "heartbeat": time.time()}
    if stale == "old-heartbeat":
        record.update(host="another-machine", heartbeat=time.time() - lease.STALE_S - 1)
    else:  # SIGKILLed here a moment ago: no need to wait for the heartbeat to age
        record.update(pid=_dead_pid())
    storage.write_text(f"{url}/{lease.LEASE_FILE}", json.dumps(record), s3)
    with Lease(url, "restart", s3):
        assert json.loads(storage.read_text(f"{url}/{lease.LEASE_FILE}", s3))["holder"] == "restart"


def test_a_fresh_lease_of_a_live_process_elsewhere_is_not_taken(tmp_path):
    record = {"holder": "run on another machine", "host": "another-machine", "pid": _dead_pid(), "since": time.time(),
              "heartbeat": time.time() - lease.STALE_S / 2}
    storage.write_text(str(tmp_path / lease.LEASE_FILE), json.dumps(record))
    with pytest.raises(OutputInUse, match=r"\(run on another machine, last heartbeat 30 s ago\)"):
        Lease(str(tmp_path), "me").take()


def test_the_heartbeat_keeps_the_lease_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    held = Lease(str(tmp_path), "long run").take()
    first = json.loads((tmp_path / lease.LEASE_FILE).read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads((tmp_path / lease.LEASE_FILE).read_text())["heartbeat"] > first
    held.release()


@pytest.mark.parametrize("env, holder", [
    ({"BARLOW_LEASE_HOLDER": "barlow run on h (pid 7, abc)", "PET_NNODES": "2"}, "barlow run on h (pid 7, abc)"),
    ({"PET_NNODES": "4", "BARLOW_POD_NAMESPACE": "vision"}, "job vision/imagenet-r50"),  # every pod of the job, restarts too
])
def test_who_holds_the_lease(monkeypatch, env, holder):
    for k in ("BARLOW_LEASE_HOLDER", "PET_NNODES", "BARLOW_POD_NAMESPACE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert lease.holder_here("imagenet-r50") == holder


def test_a_killed_process_not_yet_reaped_holds_no_lease():
    """A SIGKILLed run's process is a zombie until its new parent reaps it: its lease is taken over all the same."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while time.time() < deadline:  # exited, not yet waited for: a zombie
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    assert not lease._alive(child.pid)
    child.wait()
    assert lease._alive(os.getpid())
