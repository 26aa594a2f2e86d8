"""Progress where Kubeflow shows it: Trainer v2's status server (KEP-2779, the `TrainJobStatus` feature gate).

Where the gate is on, the controller gives every trainer container KUBEFLOW_TRAINER_SERVER_URL (the POST address of
this TrainJob), KUBEFLOW_TRAINER_SERVER_CA_CERT (a file: the server's CA) and KUBEFLOW_TRAINER_SERVER_TOKEN (a file:
a projected service-account token that rotates). The main rank POSTs
`{"trainerStatus": {"progressPercentage", "estimatedRemainingSeconds", "metrics": [{"name", "value"}],
"lastUpdatedTime"}}` there and the TrainJob's `status.trainerStatus` shows it.

Reporting must never cost training anything: the loop only hands over numbers (no I/O), a background thread POSTs
at most once every MIN_INTERVAL_S with short timeouts, and a server that is down, slow or answers errors gets one
log line the first time, then silence. Imports nothing of barlow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

URL_ENV, CA_ENV, TOKEN_ENV = "KUBEFLOW_TRAINER_SERVER_URL", "KUBEFLOW_TRAINER_SERVER_CA_CERT", "KUBEFLOW_TRAINER_SERVER_TOKEN"
MIN_INTERVAL_S = 5.0  # at most one POST this often
TIMEOUT_S = 3.0  # connect + read of one POST
MAX_METRICS, MAX_CHARS = 256, 64  # the TrainerStatus schema's limits (metrics items; name and value lengths)
log = logging.getLogger("barlow.trainer_status")


def from_env(total_steps: int, start_step: int = 0, env: Mapping[str, str] = os.environ,
             say: Callable[[str], None] = log.warning) -> Reporter | None:
    """A started reporter when the Trainer gave this pod its status server (all three variables), else None."""
    url, ca, token = env.get(URL_ENV), env.get(CA_ENV), env.get(TOKEN_ENV)
    if not (url and ca and token):
        return None
    return Reporter(url, ca, token, total_steps, start_step, say=say)


def body(percent: int, remaining_s: int | None, metrics: Mapping[str, float], now: float) -> dict[str, Any]:
    """The request the status server takes (UpdateTrainJobStatusRequest)."""
    status: dict[str, Any] = {"progressPercentage": percent}
    if remaining_s is not None:
        status["estimatedRemainingSeconds"] = remaining_s
    items = [{"name": k[:MAX_CHARS], "value": f"{v:.6g}"[:MAX_CHARS]} for k, v in metrics.items()
             if k and isinstance(v, int | float) and math.isfinite(v)]
    if items:
        status["metrics"] = items[:MAX_METRICS]
    status["lastUpdatedTime"] = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # RFC 3339
    return {"trainerStatus": status}


class Reporter:
    """The latest progress of this process, POSTed by a background thread (see the module's doc)."""

    def __init__(self, url: str, ca_file: str, token_file: str, total_steps: int, start_step: int = 0, *,
                 min_interval_s: float = MIN_INTERVAL_S, timeout_s: float = TIMEOUT_S,
                 say: Callable[[str], None] = log.warning):
        self.url, self.ca_file, self.token_file = url, ca_file, token_file
        self.total, self.min_interval_s, self.timeout_s, self.say = max(total_steps, 1), min_interval_s, timeout_s, say
        self.start_step, self.started = start_step, time.monotonic()
        self.step, self.percent, self.metrics = start_step, 0, {}
        self.posted = 0  # successful POSTs
        self._failed_once = False
        self._dirty, self._closing = False, False  # the first update starts the POSTs
        self._last_post = -math.inf
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="trainer-status", daemon=True)
        self._thread.start()

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """The run is at `step`, with these latest values (merged into those seen before). No I/O."""
        with self._cond:
            self.step = max(self.step, step)
            self.percent = max(self.percent, min(100, 100 * self.step // self.total))  # never decreasing
            if metrics:
                self.metrics.update({k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})
            self._dirty = True
            self._cond.notify()

    def close(self, finished: bool) -> None:
        """Send the last status (100 % when `finished`) and stop; waits at most one interval and one timeout."""
        with self._cond:
            if finished:
                self.percent = 100
            self._dirty, self._closing = True, True
            self._cond.notify()
        self._thread.join(self.min_interval_s + self.timeout_s + 1)

    def _remaining_s(self) -> int | None:
        done = self.step - self.start_step
        if self.percent >= 100:
            return 0
        if done <= 0:
            return None
        return int((self.total - self.step) * (time.monotonic() - self.started) / done)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._dirty:
                    if self._closing:
                        return
                    self._cond.wait()
                wait = self._last_post + self.min_interval_s - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)  # later values replace these meanwhile; a close ends the wait
                    if time.monotonic() < self._last_post + self.min_interval_s:
                        continue
                request = body(self.percent, self._remaining_s(), dict(self.metrics), time.time())
                self._dirty, closing = False, self._closing
                self._last_post = time.monotonic()
            self._post(request)
            if closing:
                return

    def _post(self, request: dict[str, Any]) -> None:
        try:
            with open(self.token_file) as f:  # read at every POST: the projected token rotates
                token = f.read().strip()
            context = ssl.create_default_context(cafile=self.ca_file)
            req = urllib.request.Request(self.url, data=json.dumps(request).encode(), method="POST", headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=self.timeout_s, context=context) as response:
                response.read()
            self.posted += 1
        except Exception as e:  # progress reporting is best effort: never the run's failure
            if not self._failed_once:
                self._failed_once = True
                self.say(f"trainer status: POST to {self.url} failed ({type(e).__name__}: {e}); training goes on, "
                         "further failures are not logged")
