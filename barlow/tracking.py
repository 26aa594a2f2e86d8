"""Experiment trackers beside TensorBoard: MLflow (`output.mlflow`), an optional extra (pip install 'barlow[mlflow]').

One MLflow run per output folder: the run is tagged with `output.url`, so a resumed pretraining logs on into the
same MLflow run. Params are the resolved spec's fields (dotted names), metrics are every line of metrics.jsonl,
and the exported backbone is an artifact. Only the main rank talks to the tracking server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
from typing import Any

from barlow.errors import MissingExtra, RunFailed

OUTPUT_TAG = "barlow.output_url"
MAX_PARAMS_PER_CALL = 100  # MLflow's log_batch limit


def require_mlflow() -> None:
    """Raise one line naming the extra when output.mlflow is set but mlflow is not installed."""
    if importlib.util.find_spec("mlflow") is None:
        raise MissingExtra("output.mlflow: needs the mlflow package, which is not installed "
                           "(pip install 'barlow[mlflow]', or leave output.mlflow out)")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"optim": {"lr": 0.2}}` -> `{"optim.lr": "0.2"}`; lists and None as JSON."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


class MlflowTracker:
    """Logs one barlow run to MLflow: params at start, metrics per log line, files as artifacts, the end status.

    A tracking server that stops answering mid-run costs its metrics, not the run: the first failure prints one
    warning and the tracker stops logging (metrics.jsonl and TensorBoard keep everything).
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, output_url: str, params: dict[str, str],
                 warn=print):
        require_mlflow()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.warn, self.active = warn, True
        if tracking_uri.startswith("file:"):  # MLflow 3 refuses its file store unless opted in; naming one is the opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client = MlflowClient(tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{OUTPUT_TAG}` = '{_quoted(output_url)}'",
                                           max_results=1)
            if runs:  # a resumed run: log on into the MLflow run of this output folder
                self.run_id = runs[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags={OUTPUT_TAG: output_url}).info.run_id
                items = [Param(k, v) for k, v in params.items()]
                for i in range(0, len(items), MAX_PARAMS_PER_CALL):
                    self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_PER_CALL])
        except Exception as e:  # a wrong URI, an unreachable server, a refused login: fail before training starts
            raise RunFailed(f"output.mlflow: cannot start an MLflow run at {tracking_uri} ({type(e).__name__}: "
                            f"{_first_line(e)})") from None

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items() if isinstance(v, int | float)]
        self._call(lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def log_artifact(self, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="barlow-mlflow-") as tmp:
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(data)
            self._call(lambda: self.client.log_artifact(self.run_id, path))

    def close(self, status: str = "FINISHED") -> None:
        self._call(lambda: self.client.set_terminated(self.run_id, status=status))

    def _call(self, fn) -> None:
        if not self.active:
            return
        try:
            fn()
        except Exception as e:
            self.active = False
            self.warn(f"warning: MLflow stopped answering ({type(e).__name__}: {_first_line(e)}); metrics go on to "
                      f"metrics.jsonl and TensorBoard only")


def _quoted(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else ""
