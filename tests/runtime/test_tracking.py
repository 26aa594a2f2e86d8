"""MLflow as an experiment tracker (output.mlflow): a pretraining run logs its spec as params, its metric lines as
metrics and its exported backbone as an artifact to MLflow's local file store; without mlflow installed, one line."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from barlow.data.demo import write_demo
from barlow.errors import MissingExtra
from barlow.spec import SpecError, parse_spec
from barlow.tracking import flatten

pytestmark = pytest.mark.usefixtures("one_thread")


def spec_of(demo, out, tracking_uri: str) -> dict:
    return {"kind": "pretrain", "name": "tracked",
            "data": {"train": str(demo / "train"), "val": str(demo / "val"), "image_size": 16, "workers": 0},
            "model": {"arch": "resnet18", "small_images": True, "width": 8, "projector": "64-64"},
            "optim": {"epochs": 1, "batch_size": 256, "warmup_epochs": 0.5},
            "runtime": {"device": "cpu", "log_every": 2, "seed": 3},
            "monitor": {"knn_images": 10, "knn_train_images": 141},
            "output": {"url": str(out), "checkpoint_every": 1000,
                       "mlflow": {"tracking_uri": tracking_uri, "experiment": "barlow-tests"}}}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo(str(root), size=16)
    return root


def test_a_pretraining_run_reads_back_from_mlflows_file_store(demo, tmp_path):
    from mlflow.tracking import MlflowClient

    from barlow.train import pretrain

    store, out = f"file://{tmp_path / 'mlruns'}", tmp_path / "out"
    pretrain(parse_spec(spec_of(demo, out, store)))

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("barlow-tests")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    params = run.data.params
    assert params["optim.batch_size"] == "256" and params["model.arch"] == "resnet18"
    assert params["data.augment.blur_prob"] == "[1.0, 0.1]" and params["output.url"] == str(out)

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "probe_top1", "knn_top1"):
        logged = [(r["step"], r[key]) for r in lines if key in r]
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert logged and [s for s, _ in history] == [s for s, _ in logged], key
        assert [v for _, v in history] == pytest.approx([v for _, v in logged], abs=1e-6), key  # the jsonl rounds to 6 digits

    path = client.download_artifacts(run.info.run_id, "backbone.pt", str(tmp_path / "download"))
    got, exported = torch.load(path, weights_only=True), torch.load(out / "backbone.pt", weights_only=True)
    assert got.keys() == exported.keys() and all(torch.equal(got[k], exported[k]) for k in got)


def test_a_resumed_run_logs_on_into_the_same_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from barlow.tracking import MlflowTracker

    store = f"file://{tmp_path / 'mlruns'}"
    first = MlflowTracker(store, "e", "r", "s3://bucket/run-1", {"optim.lr": "0.2"})
    first.log(10, {"loss": 2.0})
    first.close("KILLED")
    again = MlflowTracker(store, "e", "r", "s3://bucket/run-1", {"optim.lr": "0.2"})
    again.log(20, {"loss": 1.0})
    again.close()
    other = MlflowTracker(store, "e", "r", "s3://bucket/run-2", {"optim.lr": "0.2"})
    other.close()
    assert again.run_id == first.run_id != other.run_id
    client = MlflowClient(store)
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")] == [(10, 2.0), (20, 1.0)]
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_without_mlflow_a_spec_with_output_mlflow_fails_in_one_line_before_writing(demo, tmp_path, monkeypatch):
    from barlow.train import pretrain

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an environment without the extra looks like to import
    out = tmp_path / "out"
    with pytest.raises(MissingExtra) as e:
        pretrain(parse_spec(spec_of(demo, out, f"file://{tmp_path / 'mlruns'}")))
    assert str(e.value) == ("output.mlflow: needs the mlflow package, which is not installed "
                            "(pip install 'barlow[mlflow]', or leave output.mlflow out)")
    assert not out.exists()


def test_an_unreachable_tracking_server_fails_before_training(demo, tmp_path, monkeypatch):
    from barlow.errors import RunFailed
    from barlow.train import pretrain

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would take minutes here

    spec = spec_of(demo, tmp_path / "out", "http://127.0.0.1:9")  # the discard port: nothing answers
    with pytest.raises(RunFailed, match=r"^output.mlflow: cannot start an MLflow run at http://127.0.0.1:9 "):
        pretrain(parse_spec(spec))
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("mlflow, error", [
    ({"experiment": "x"}, "output.mlflow.tracking_uri: required field is missing"),
    ({"tracking_uri": "https://user:pw@mlflow.example.com"}, "output.mlflow.tracking_uri: must not contain "
     "credentials (set MLFLOW_TRACKING_USERNAME / _PASSWORD or _TOKEN)"),
    ({"tracking_uri": "file:///m", "experiment": ""}, "output.mlflow.experiment: String should have at least 1 character"),
    ({"tracking_uri": "file:///m", "run": "x"}, "output.mlflow.run: unknown field"),
])
def test_bad_mlflow_settings_name_the_field(tmp_path, mlflow, error):
    spec = spec_of(tmp_path, tmp_path / "out", "file:///m")
    spec["output"]["mlflow"] = mlflow
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    assert e.value.problems == [error]


def test_params_are_the_specs_fields_by_dotted_name():
    assert flatten({"optim": {"lr": 0.2, "epochs": 3}, "name": "x", "eval": {"checkpoint": None, "ks": [1, 5]}, "e": {}}) == {
        "optim.lr": "0.2", "optim.epochs": "3", "name": "x", "eval.checkpoint": "null", "eval.ks": "[1, 5]", "e": "{}"}


def test_an_eval_logs_to_mlflow_as_a_pretraining_does_and_a_stopped_one_ends_killed(demo, tmp_path):
    """The run skeleton is shared: an eval opens the same tracker, a stop closes it KILLED, the rerun logs on."""
    from mlflow.tracking import MlflowClient

    from barlow import checkpoint
    from barlow.errors import StoppedOnSignal
    from barlow.evaluate import evaluate
    from barlow.model import BarlowTwins

    model = {"arch": "resnet18", "small_images": True, "width": 8, "projector": "64-64"}
    torch.manual_seed(0)
    pretrained = str(tmp_path / "pretrain")
    checkpoint.save(pretrained, 4, {"model": BarlowTwins(**model).state_dict(), "step": 4,
                                    "run": {"model": model, "batch_size": 256}}, keep=1)
    store = f"file://{tmp_path / 'mlruns'}"
    spec = parse_spec({"kind": "eval", "name": "tracked-eval",
                       "data": {"train": str(demo / "train"), "val": str(demo / "val"), "image_size": 16, "workers": 0},
                       "eval": {"checkpoint": pretrained, "epochs": 1, "batch_size": 64, "train_percent": 10},
                       "runtime": {"device": "cpu", "log_every": 1},
                       "output": {"url": str(tmp_path / "eval"), "mlflow": {"tracking_uri": store, "experiment": "e"}}})
    with pytest.raises(StoppedOnSignal):
        evaluate(spec, stop_signal=lambda: 15)  # SIGTERM at the first stop point
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert run.info.status == "KILLED" and run.info.run_name == "tracked-eval"
    assert run.data.params["eval.train_percent"] == "10"

    results = evaluate(spec)
    (again,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    for key in ("top1", "knn_top1"):
        assert [m.value for m in client.get_metric_history(run.info.run_id, key)] == pytest.approx([results[key]]), key
