"""One run at a time per output folder: a lease file, `<output.url>/lease.json`, local or on S3.

A run takes the lease before it writes anything and keeps it fresh with a heartbeat; a second run on the same output
is refused in one line while the lease is fresh. Who holds it is the run's identity, not a process: the local
`barlow run` (its torchrun workers carry its identity in BARLOW_LEASE_HOLDER), or on a cluster the job
(`job <namespace>/<name>`), so that torchrun's restarts and a job's restarted pods take their own lease over at once.
A lease is stale, and taken over, when its heartbeat is older than STALE_S, or at once when its holder's process on
this machine is gone (a SIGKILLed local run). Released (deleted, if still ours) when the run ends.

Object stores have no exclusive create: a taker writes, waits SETTLE_S, and reads back; of two runs that start
together, only the one whose write is read back goes on. No torch here (the CLI takes the lease too).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from barlow import storage
from barlow.errors import OutputInUse
from barlow.spec import POD_NAMESPACE_ENV

LEASE_FILE = "lease.json"
HOLDER_ENV = "BARLOW_LEASE_HOLDER"  # the identity a local `barlow run` hands to its torchrun workers
OPERATOR_ENV = "PET_NNODES"  # set for torchrun by the operator in every training pod (as barlow.restarts reads it)
HEARTBEAT_S = 15.0  # seconds between heartbeats
STALE_S = 60.0  # a lease whose heartbeat is older than this is taken over
SETTLE_S = (0.05, 1.0)  # in this machine's files or memory / in an object store: the wait before the read-back


def holder_here(run_name: str) -> str:
    """This process's run identity: the local CLI's (from its environment), the job's in an operator's pod, else this
    process's own."""
    if os.environ.get(HOLDER_ENV):
        return os.environ[HOLDER_ENV]
    if os.environ.get(OPERATOR_ENV):
        return f"job {os.environ.get(POD_NAMESPACE_ENV, '?')}/{run_name}"
    return new_holder()


def new_holder() -> str:
    """A fresh identity for a run started here (the local `barlow run`)."""
    return f"barlow run on {socket.gethostname()} (pid {os.getpid()}, {uuid.uuid4().hex[:8]})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:  # a killed process stays a zombie until its new parent reaps it: dead all the same
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): kill(0) is all there is
        return True


@dataclass
class Lease:
    """The lease of `output_url` for `holder`: `take()` (raises OutputInUse), a heartbeat thread, `release()`."""

    output_url: str
    holder: str
    s3: storage.S3Settings | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return storage.join(self.output_url, LEASE_FILE)

    def _record(self, since: float) -> dict[str, Any]:
        return {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(), "since": since,
                "heartbeat": time.time()}

    def read(self) -> dict[str, Any] | None:
        """The lease as stored, or None (no lease, or one that is not a lease record)."""
        try:
            found = json.loads(storage.read_text(self.url, self.s3))
        except FileNotFoundError:
            return None
        except ValueError:  # half a file from a crashed local writer cannot happen (atomic), but never trust one
            return None
        return found if isinstance(found, dict) and "holder" in found else None

    def _refusal(self, other: dict[str, Any]) -> str | None:
        """Why `other` (a stored lease) keeps this run out, or None when it is ours or stale."""
        if other.get("holder") == self.holder:
            return None
        age = time.time() - float(other.get("heartbeat", 0))
        same_host = other.get("host") == socket.gethostname()
        if age > STALE_S or (same_host and isinstance(other.get("pid"), int) and not _alive(other["pid"])):
            return None
        return (f"output.url: {self.output_url} is in use by another run ({other.get('holder')}, last heartbeat "
                f"{max(age, 0):.0f} s ago): wait for it to end or stop it, or use a new output.url (a lease without a "
                f"heartbeat for {STALE_S:.0f} s, or whose process on this machine is gone, is taken over)")

    def take(self) -> Lease:
        """Take the lease (or keep ours) and start the heartbeat; raises OutputInUse (one line) while another run's
        lease is fresh."""
        current = self.read()
        why = self._refusal(current) if current else None
        if why:
            raise OutputInUse(why)
        since = float(current["since"]) if current and current.get("holder") == self.holder else time.time()
        storage.write_text(self.url, json.dumps(self._record(since)), self.s3)
        time.sleep(SETTLE_S[0] if storage.is_local(self.url) or self.url.startswith("memory://") else SETTLE_S[1])
        back = self.read()
        if back is None or back.get("holder") != self.holder:
            raise OutputInUse(self._refusal(back or {}) or f"output.url: {self.output_url} was taken by another run "
                              "that started at the same moment: use a new output.url, or wait for it to end")
        self._thread = threading.Thread(target=self._beat, args=(since,), name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self, since: float) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                current = self.read()
                if current is None or current.get("holder") != self.holder:
                    return  # released by a process of this run, or taken over after we went stale: leave it
                storage.write_text(self.url, json.dumps(self._record(since)), self.s3)
            except Exception:  # a missed heartbeat only ages the lease; the next one tries again
                continue

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current = self.read()
            if current is not None and current.get("holder") == self.holder:
                storage.remove(self.url, self.s3)
        except OSError:  # the lease goes stale by itself
            pass

    def __enter__(self) -> Lease:
        return self.take()

    def __exit__(self, *exc: object) -> None:
        self.release()
