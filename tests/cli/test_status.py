"""`barlow status`: a run's progress from its own files (written by the real metrics, checkpoint and restart-record
writers, on a local folder and on the S3 server), and from the cluster, why a job's pods are not running and what
Kueue says, on both backends, against the local stand-in of the Kubernetes API (tests/support/fake_kube.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import fake_kube
import pytest
import torch
import yaml
from fake_kube import FakeKube
from typer.testing import CliRunner

from barlow import checkpoint, metrics, restarts, storage
from barlow.cli import app
from barlow.launch import backend
from barlow.launch.pods import job_selector
from barlow.spec import parse_spec
from barlow.status import runfiles as progress

IMAGE = "registry.example.com/barlow:0.1.0"
SPEC = {
    "kind": "pretrain", "name": "demo",
    "data": {"train": "s3://bucket/train", "val": "s3://bucket/val"},
    "output": {"url": "s3://bucket/runs/demo"},
    "runtime": {"nodes": 2, "nproc_per_node": 4, "device": "cuda"},
    "optim": {"batch_size": 256, "epochs": 10, "warmup_epochs": 1},
    "cluster": {"gpus_per_node": 4, "image": IMAGE},
}


def barlow(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def fields(stdout: str) -> dict[str, str]:
    """The screen's `label: value` lines (a repeated label keeps its last value)."""
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in stdout.splitlines() if ":" in line)}


class Clock:
    """The metrics writer's clock: it starts a minute ago, and each log step comes 2 s after the last."""

    def __init__(self):
        self.start = self.t = time.time() - 60

    def time(self) -> float:
        return self.t


def write_run(out: str, monkeypatch, rows: list[tuple[int, dict]], *, total_steps: int = 100, steps_per_epoch: int = 10,
              spec: dict | None = None, monitor_keys: tuple[str, ...] = ()) -> Clock:
    """run.json as train.set_up writes it, then metrics lines through the real Metrics writer, 2 s apart."""
    clock = Clock()
    monkeypatch.setattr(metrics, "time", SimpleNamespace(time=clock.time))
    run_spec = parse_spec({**SPEC, "output": {"url": out}, **(spec or {})})
    progress.record_run(run_spec, total_steps, steps_per_epoch, run_spec.optim.batch_size, monitor_keys=monitor_keys)
    writer = metrics.Metrics(out, True, total_steps)
    for step, values in rows:
        clock.t += 2.0
        writer.log(step, {"epoch": step / steps_per_epoch, "images_per_s": 1280.0, **values})
    writer.close()
    return clock


def steps(*numbers: int, **values) -> list[tuple[int, dict]]:
    return [(n, {"loss": 100.0 - n, **values}) for n in numbers]


# -- progress from the run's files ------------------------------------------------------------------------------------


def test_progress_of_a_running_run(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    clock = write_run(out, monkeypatch, steps(10, 20, 30, 40, 50, probe_top1=41.5))
    checkpoint.save(out, 40, {"w": torch.zeros(2)}, keep=2)
    os.utime(os.path.join(out, "checkpoints", "step-00000040", storage.COMMIT_MARKER), (clock.start, clock.start))
    p = progress.read(out, now=clock.t + 3)
    assert (p.state, p.name, p.kind, p.step, p.total_steps, p.epoch, p.epochs) == (
        "running", "demo", "pretrain", 50, 100, 5.0, 10)
    assert (p.loss, p.probe_top1, p.knn_top1, p.images_per_s) == (50.0, 41.5, None, 1280.0)
    assert p.steps_per_s == pytest.approx(5.0)  # 10 steps every 2 s
    assert p.eta_s == pytest.approx(10.0)  # 50 steps to go
    assert p.updated_age_s == pytest.approx(3.0, abs=0.01)
    assert p.checkpoint == progress.Checkpoint("step-00000040", 40, pytest.approx(clock.t + 3 - clock.start))
    assert p.restarts is None and p.healthy  # a local run keeps no restart record


def test_the_rate_is_measured_on_the_current_attempt_only(tmp_path, monkeypatch):
    # attempt 1 logs steps 10..40, dies; attempt 2 resumes at its checkpoint (step 30) and logs 40, 50, 60
    out = str(tmp_path / "run")
    clock = write_run(out, monkeypatch, steps(10, 20, 30, 40))
    clock.t += 600  # the restart took 10 minutes
    writer = metrics.Metrics(out, True, 100, 30)
    for n in (40, 45, 50):
        clock.t += 2.0
        writer.log(n, {"epoch": n / 10, "loss": 1.0})
    writer.close()
    p = progress.read(out, now=clock.t)
    assert p.step == 50 and p.steps_per_s == pytest.approx(2.5)  # 10 steps in 4 s, not across the restart
    assert p.eta_s == pytest.approx(20.0)


def test_a_knn_line_is_no_step(tmp_path, monkeypatch):
    # the kNN monitor logs its own line at a step already logged, without the loss: no new attempt, no rate change
    out = str(tmp_path / "run")
    clock = write_run(out, monkeypatch, [*steps(10, 20), (20, {"knn_top1": 55.5}), *steps(30, 40)])
    p = progress.read(out, now=clock.t)
    assert (p.step, p.knn_top1, p.loss, p.images_per_s) == (40, 55.5, 60.0, 1280.0)
    assert p.steps_per_s == pytest.approx(30 / 8)  # steps 10 to 40 over the 8 s from the first line to the last


@pytest.mark.parametrize("rows, now_after, state, warning", [
    (steps(10, 20), 1.0, "running", None),
    (steps(10, 20), 3600.0, "stalled", "no metrics line for 1 h (one came every 2 s): the run is stopped or stuck"),
    ([(10, {"loss": 5.0}), (20, {"loss": float("nan")})], 1.0, "running", "loss is nan at step 20: training diverged"),
    ([], 0.0, "not started", None),
    ([*steps(10, 20), (20, {"rankme_features": 3.0, "rankme_projector": 1.2, "constant_dims": 0.9,
                            "collapse_below": 6.4})], 1.0, "running",
     "collapse: the projector output's effective rank (RankMe) is 1.2, below 6.4 (monitor.collapse_fraction of its "
     "largest possible value)"),
    ([*steps(10, 20), (20, {"rankme_features": 50.0, "rankme_projector": 40.0, "constant_dims": 0.0,
                            "collapse_below": 6.4})], 1.0, "running", None),
])
def test_state_and_health(tmp_path, monkeypatch, rows, now_after, state, warning):
    out = str(tmp_path / "run")
    clock = write_run(out, monkeypatch, rows)
    p = progress.read(out, now=clock.t + now_after)
    assert p.state == state
    assert p.warnings == ([warning] if warning else [])
    assert p.healthy == (warning is None)


def test_a_finished_run_has_no_eta(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    clock = write_run(out, monkeypatch, steps(50, 100))
    storage.write_text(storage.join(out, "summary.json"), "{}")
    p = progress.read(out, now=clock.t)
    assert (p.state, p.step, p.eta_s) == ("finished", 100, None)


def test_an_incomplete_checkpoint_is_not_the_latest(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    clock = write_run(out, monkeypatch, steps(10, 20, 30))
    checkpoint.save(out, 20, {"w": torch.zeros(1)}, keep=2)
    storage.write_bytes(storage.join(checkpoint.folder(out), "step-00000030", "state.pt"), b"cut short")  # no marker
    assert progress.read(out, now=clock.t).checkpoint.name == "step-00000020"


def test_restarts_used_count_retryable_failures_since_the_latest_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    clock = write_run(out, monkeypatch, steps(10, 20), spec={"cluster": {**SPEC["cluster"], "max_restarts": 2}})
    checkpoint.save(out, 10, {"w": torch.zeros(1)}, keep=2)
    for code in (137, 137):  # two attempts killed with retryable codes, no checkpoint between them
        attempt = restarts.Budget.read(out, 2)
        assert attempt.at_start() is None
        attempt.at_end(code)
    restarts.Budget.read(out, 2).at_start()  # the third attempt is running: not counted until it ends
    p = progress.read(out, now=clock.t)
    assert p.restarts == progress.Restarts(used=2, max=2, attempts=3)
    assert dict(progress.lines(p))["restarts"] == "2 of 2 since the latest checkpoint (3 attempts)"
    assert p.warnings == ["restart budget spent: 2 of cluster.max_restarts 2 restarts since the latest checkpoint; "
                          "the next retryable failure ends the run"]
    checkpoint.save(out, 20, {"w": torch.zeros(1)}, keep=2)  # a new checkpoint ends the streak
    assert progress.read(out, now=clock.t).restarts.used == 0


def test_progress_reads_an_s3_output_as_a_local_one(s3, monkeypatch):
    clock = write_run(s3.url, monkeypatch, steps(10, 20, 30))
    checkpoint.save(s3.url, 30, {"w": torch.zeros(1)}, keep=2)
    p = progress.read(s3.url, now=clock.t + 1)
    assert (p.state, p.step, p.total_steps, p.loss) == ("running", 30, 100, 70.0)
    assert p.checkpoint.name == "step-00000030" and p.checkpoint.age_s is not None  # the marker's LastModified


def test_progress_imports_no_torch():
    code = "import sys, barlow.status.runfiles, barlow.status.report, barlow.launch.pods; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_run_stopped_by_a_signal_says_stopped_until_it_resumes(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    clock = write_run(out, monkeypatch, steps(10, 20, 30))
    checkpoint.save(out, 30, {"w": torch.zeros(1)}, keep=2)
    writer = metrics.Metrics(out, True, 100)
    writer.stopped(30, 2)  # Ctrl-C, after the checkpoint (train.pretrain)
    writer.close("KILLED")
    p = progress.read(out, now=clock.t + 1)
    assert (p.state, p.stopped_by_signal, p.step, p.eta_s) == ("stopped", 2, 30, None)
    shown = dict(progress.lines(p, clock.t + 1))
    assert shown["state"] == "stopped by signal 2 after step-00000030 (rerun the same spec to resume)" and "ETA" not in shown
    write_run(out, monkeypatch, steps(40))  # the rerun resumes
    assert progress.read(out).state == "running"


def test_corrupt_images_skipped_are_counted_over_attempts(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    write_run(out, monkeypatch, [(10, {"loss": 1.0, "corrupt_images": 2.0}), (20, {"loss": 1.0, "corrupt_images": 5.0})])
    assert "corrupt images skipped 5" in capsys.readouterr().out.splitlines()[-1]  # the progress line
    write_run(out, monkeypatch, [(15, {"loss": 1.0, "corrupt_images": 1.0})])  # an attempt counts from 0 again
    capsys.readouterr()
    p = progress.read(out)
    assert p.corrupt_images == 6
    assert dict(progress.lines(p))["corrupt"] == "6 undecodable images skipped (data.on_corrupt: skip)"
    write_run(str(tmp_path / "clean"), monkeypatch, steps(10, corrupt_images=0.0))
    assert "corrupt" not in capsys.readouterr().out and "corrupt" not in dict(progress.lines(progress.read(str(tmp_path / "clean"))))


# -- barlow status OUTPUT ----------------------------------------------------------------------------------------------


def test_status_of_an_output_folder(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    write_run(out, monkeypatch, steps(10, 20, 30, probe_top1=35.25))
    checkpoint.save(out, 30, {"w": torch.zeros(1)}, keep=2)
    result = barlow("status", out)
    assert result.exit_code == 0, result.stderr
    shown = fields(result.stdout)
    assert shown["output"] == out and shown["run"] == "demo (pretrain)"
    assert shown["step"] == "30 / 100 (30.0 %)   epoch 3.00 of 10"
    assert shown["loss"] == "70" and shown["probe"] == "top-1 35.2 % (online linear probe)"
    assert shown["speed"] == "1,280 images/s, 5 steps/s"
    assert shown["checkpoint"].startswith("step-00000030, ")
    assert "kNN" not in shown and "restarts" not in shown


def test_status_json_has_the_documented_fields(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    write_run(out, monkeypatch, steps(10, 20))
    result = barlow("status", out, "-o", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == {"schema", "time", "job", "admission", "pods", "progress", "progress_error"}
    assert (doc["schema"], doc["job"], doc["pods"]) == ("barlow.status/v1", None, [])
    assert set(doc["progress"]) == {"output", "state", "name", "kind", "step", "total_steps", "epoch", "epochs", "loss",
                                    "probe_top1", "knn_top1", "rankme_features", "rankme_projector", "constant_dims",
                                    "collapse_below", "images_per_s", "steps_per_s", "eta_s", "updated_age_s",
                                    "checkpoint", "restarts", "stopped_by_signal", "corrupt_images", "goodput", "warnings", "healthy"}
    assert (doc["progress"]["step"], doc["progress"]["total_steps"], doc["progress"]["healthy"]) == (20, 100, True)


def test_watch_prints_one_json_line_per_refresh(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    write_run(out, monkeypatch, steps(10))
    result = barlow("status", out, "--watch", "--interval", "0", "--count", "2", "-o", "json")
    assert result.exit_code == 0, result.stderr
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [d["progress"]["step"] for d in docs] == [10, 10]


def test_status_of_a_local_run_from_its_spec(tmp_path, monkeypatch):
    """A spec without a cluster section runs here (barlow run): -f reads its output.url, and asks no cluster."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    out = str(tmp_path / "run")
    write_run(out, monkeypatch, steps(10, 20))
    local = {k: v for k, v in SPEC.items() if k != "cluster"} | {"output": {"url": out}, "runtime": {"device": "cpu"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(local))
    result = barlow("status", "-f", tmp_path / "spec.yaml")
    assert result.exit_code == 0, result.stderr
    shown = fields(result.stdout)
    assert (shown["output"], shown["step"], shown["state"]) == (out, "20 / 100 (20.0 %)   epoch 2.00 of 10", "running")
    assert "job" not in shown and result.stderr == ""


def test_status_of_an_s3_output_takes_the_endpoint(s3, monkeypatch):
    write_run(s3.url, monkeypatch, steps(10, 20))
    from barlow import storage

    storage.configure_s3()  # the CLI's default: AWS, unless --endpoint-url says otherwise
    result = barlow("status", s3.url, "--endpoint-url", s3.server.endpoint_url)
    assert result.exit_code == 0, result.stderr
    assert fields(result.stdout)["step"] == "20 / 100 (20.0 %)   epoch 2.00 of 10"


def test_status_of_an_unreachable_s3_endpoint_is_one_line(monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    result = barlow("status", "s3://bucket/runs/x", "--endpoint-url", f"http://127.0.0.1:{port}")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: s3://bucket/runs/x: ") and str(port) in lines[0], result.stderr


@pytest.mark.parametrize("args, code, message", [
    (["runs/no-such-run"], 2, "error: runs/no-such-run: no such output folder"),
    ([], 2, "error: give a job name, an output folder or URL, or -f SPEC"),
    (["runs/x", "-f", "SPEC"], 2, "error: give an output folder or -f SPEC, not both"),
])
def test_status_input_errors_are_one_line(tmp_path, monkeypatch, args, code, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SPEC").write_text(yaml.safe_dump(SPEC))
    result = barlow("status", *args)
    assert result.exit_code == code
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(message), result.stderr


# -- from the cluster: pods and Kueue -----------------------------------------------------------------------------------


def submit(tmp_path, name: str, **cluster) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "cluster": {**SPEC["cluster"], "backend": name, **cluster}}))
    assert (result := barlow("submit", "pretrain", path)).exit_code == 0, result.stderr
    return str(path)


def add_pod(kube, b, replica: str, status: dict, job: str = "demo") -> str:
    """A pod of `replica` labelled as the backend's operator labels it."""
    labels = dict(term.split("=", 1) for term in b.pod_selector(job, replica).split(","))
    name = f"{job}-{replica}-x"
    kube.add_pod("barlow", name, labels, status=status)
    return name


INSUFFICIENT = ("0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available: "
                "4 No preemption victims found for incoming pod.")
CASES = [  # (pod status, what its line says)
    (fake_kube.unschedulable(INSUFFICIENT), f"Pending - Unschedulable: {INSUFFICIENT}"),
    (fake_kube.image_pull("{c}", IMAGE), f'Pending - ImagePullBackOff: Back-off pulling image "{IMAGE}"'),
    (fake_kube.image_pull("{c}", IMAGE, "ErrImagePull"),
     f'Pending - ErrImagePull: failed to pull and unpack image "{IMAGE}": failed to resolve reference "{IMAGE}": not found'),
    (fake_kube.oom_killed("{c}", IMAGE), "Failed - OOMKilled (exit code 137)"),
    (fake_kube.crash_loop("{c}", IMAGE), "Running, not ready, 4 restarts - CrashLoopBackOff: back-off 5m0s restarting "
                                         "failed container={c} pod=x; last exit: OOMKilled, exit code 137"),
    (fake_kube.running("{c}", IMAGE), "Running"),
]


def _for(container: str, value):
    return json.loads(json.dumps(value).replace("{c}", container)) if not isinstance(value, str) else value.replace(
        "{c}", container)


@pytest.mark.parametrize("name", ["pytorchjob", "trainjob"])
@pytest.mark.parametrize("status, line", CASES, ids=["unschedulable", "imagepullbackoff", "errimagepull", "oomkilled",
                                                     "crashloop", "running"])
def test_status_says_why_a_pod_is_not_running(kube, tmp_path, name, status, line):
    b = backend.get(name)
    submit(tmp_path, name)
    pod = add_pod(kube, b, "master", _for(b.container, status))
    add_pod(kube, b, "master", fake_kube.running(b.container, IMAGE), job="other")  # another job's pod: not shown
    result = barlow("status", "demo", "-b", name)
    assert result.exit_code == 0, result.stderr
    pod_lines = [line_ for line_ in result.stdout.splitlines() if line_.startswith("pod:")]
    assert pod_lines == [f"pod:       {pod} {_for(b.container, line)}"]
    lists = kube.calls("GET", "/api/v1/namespaces/barlow/pods")
    assert [r.query["labelSelector"] for r in lists] == [job_selector(b, "demo")]


@pytest.mark.parametrize("name", ["pytorchjob", "trainjob"])
def test_status_json_lists_each_pod_with_its_reason_and_exit_code(kube, tmp_path, name):
    b = backend.get(name)
    submit(tmp_path, name)
    second = "worker-0" if name == "pytorchjob" else "node-1"
    add_pod(kube, b, "master", fake_kube.running(b.container, IMAGE))
    oom = add_pod(kube, b, second, fake_kube.oom_killed(b.container, IMAGE))
    doc = json.loads(barlow("status", "demo", "-b", name, "-o", "json").stdout)
    assert doc["job"]["name"] == "demo" and doc["job"]["backend"] == name and doc["job"]["output"] == "s3://bucket/runs/demo"
    by_name = {p["name"]: p for p in doc["pods"]}
    assert by_name[oom] == {"name": oom, "phase": "Failed", "ready": False, "restarts": 0, "reason": "OOMKilled",
                            "message": "", "exit_code": 137}
    assert by_name["demo-master-x"]["reason"] == "" and by_name["demo-master-x"]["ready"] is True
    assert doc["progress"] is None  # the job alone: its files need -f SPEC or the output URL


def test_a_pending_pod_without_a_condition_message_is_explained_by_its_event(kube, tmp_path):
    b = backend.get("pytorchjob")
    submit(tmp_path, "pytorchjob")
    pod = add_pod(kube, b, "master", fake_kube.pending_without_message())
    kube.add_event("barlow", pod, "Scheduled", "old news", type="Normal", at="2026-01-01T00:00:10Z")
    kube.add_event("barlow", pod, "FailedScheduling", INSUFFICIENT, at="2026-01-01T00:00:20Z")
    kube.add_event("barlow", "another-pod", "FailedScheduling", "not this one")
    result = barlow("status", "demo", "-b", "pytorchjob")
    assert f"pod:       {pod} Pending - Unschedulable: {INSUFFICIENT}" in result.stdout.splitlines()
    (events,) = kube.calls("GET", "/api/v1/namespaces/barlow/events")
    assert events.query["fieldSelector"] == f"involvedObject.name={pod}"


QUOTA = ("couldn't assign flavors to pod set node: insufficient unused quota for nvidia.com/gpu in flavor h100, "
         "8 more needed")


@pytest.mark.parametrize("name, suspend", [("trainjob", {"suspend": True}), ("pytorchjob", {"runPolicy": {"suspend": True}})])
@pytest.mark.parametrize("kueue, conditions, cluster_queue, admission", [
    ("v1beta1", [{"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": QUOTA}], "",
     f"queue gpu-team: {QUOTA}"),
    ("v1beta2", [{"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": "Quota reserved"},
                 {"type": "Admitted", "status": "True", "reason": "Admitted", "message": "The workload is admitted"}],
     "team-cq", "queue gpu-team: admitted by cluster queue team-cq"),
    ("v1beta1", [{"type": "Evicted", "status": "True", "reason": "Preempted",
                  "message": "Preempted to accommodate a workload (UID: 1234) due to prioritization in the ClusterQueue"}],
     "", "queue gpu-team: evicted (Preempted): Preempted to accommodate a workload (UID: 1234) due to prioritization in "
         "the ClusterQueue"),
    ("v1beta1", None, "", "queue gpu-team: Kueue has made no Workload for this job (is Kueue installed, with this job "
                          "kind's integration enabled?)"),
])
def test_status_shows_kueue_s_admission_of_a_queued_job(tmp_path, monkeypatch, name, suspend, kueue, conditions,
                                                         cluster_queue, admission):
    with FakeKube(kueue=kueue) as kube:
        monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path / "kubeconfig")))
        for var in ("KUBERNETES_SERVICE_HOST", "BARLOW_SPEC", "BARLOW_NAMESPACE", "BARLOW_BACKEND"):
            monkeypatch.delenv(var, raising=False)
        submit(tmp_path, name, queue="gpu-team")
        b = backend.get(name)
        job = kube.stored(b.plural, group=b.api_version)["demo"]
        job["spec"].update(suspend)
        if conditions is not None:
            kube.add_workload("barlow", job, conditions, cluster_queue)
            kube.add_workload("barlow", {**job, "metadata": {**job["metadata"], "uid": "another-job"}}, [])
        result = barlow("status", "demo", "-b", name)
    assert result.exit_code == 0, result.stderr
    assert fields(result.stdout)["admission"] == admission
    asked = [r for r in kube.requests if "/workloads" in r.path]
    assert asked[-1].query["labelSelector"] == f"kueue.x-k8s.io/job-uid={job['metadata']['uid']}"


def test_watch_refreshes_the_job(kube, tmp_path):
    submit(tmp_path, "trainjob")
    kube.scripted["demo"] = [  # one change per read of the job: one read per refresh
        {"spec": {"suspend": True}, "status": {"conditions": [
            {"type": "Suspended", "status": "True", "reason": "Suspended", "message": "Workload is waiting for quota"}]}},
        {"spec": {"suspend": False}, "status": {"conditions": [], "jobsStatus": [{"name": "node", "active": 2, "ready": 2}]}},
    ]
    result = barlow("status", "demo", "-b", "trainjob", "--watch", "--interval", "0", "--count", "2")
    assert result.exit_code == 0, result.stderr
    screens = result.stdout.split("\n\n")
    assert len(screens) == 2
    assert [fields(s)["phase"] for s in screens] == ["Queued", "Running"]
    assert len(kube.calls("GET", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/barlow/trainjobs/demo")) == 1 + 2


def test_status_with_the_spec_joins_the_job_and_its_files(kube, s3, tmp_path, monkeypatch):
    spec = {**SPEC, "output": {"url": s3.url}, "data": {**SPEC["data"], "s3": {"endpoint_url": s3.server.endpoint_url}},
            "cluster": {**SPEC["cluster"], "namespace": "vision", "backend": "trainjob"}}
    kube.namespaces.add("vision")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert barlow("submit", "pretrain", path).exit_code == 0
    write_run(s3.url, monkeypatch, steps(10, 20), spec={k: spec[k] for k in ("data", "cluster")})
    result = barlow("status", "-f", path)
    assert result.exit_code == 0, result.stderr
    shown = fields(result.stdout)
    assert (shown["name"], shown["namespace"], shown["output"], shown["step"]) == (
        "demo", "vision", s3.url, "20 / 100 (20.0 %)   epoch 2.00 of 10")
    assert kube.calls("GET", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/vision/trainjobs/demo")


@pytest.mark.slow
def test_status_of_a_real_local_pipeline(tmp_path):
    """A real pretraining run and its linear eval (one CPU process) write run.json, metrics and checkpoints;
    `barlow status` in a fresh process reads both outputs."""
    from barlow.data.demo import write_demo

    images = write_demo(str(tmp_path / "demo"), size=16)["train"]
    out = tmp_path / "run"
    spec = {"kind": "pretrain", "name": "tiny",
            "data": {"train": str(tmp_path / "demo" / "train"), "val": str(tmp_path / "demo" / "val"), "image_size": 16,
                     "workers": 0},
            "model": {"arch": "resnet18", "small_images": True, "width": 8, "projector": "128-128-128"},
            "optim": {"epochs": 2, "batch_size": 128, "warmup_epochs": 1},
            "runtime": {"nproc_per_node": 1, "device": "cpu", "log_every": 2, "seed": 7},
            "output": {"url": str(out), "checkpoint_every": 4, "keep": 2},
            "eval": {"epochs": 2, "batch_size": 128, "lr_head": 0.5}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    cli = [sys.executable, "-m", "barlow.cli"]
    trained = subprocess.run([*cli, "run", "pipeline", str(tmp_path / "spec.yaml")], capture_output=True, text=True,
                             timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]

    def status(folder) -> dict:
        shown = subprocess.run([*cli, "status", str(folder), "-o", "json"], capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        return json.loads(shown.stdout)["progress"]

    p = status(out)
    assert (p["state"], p["name"], p["kind"], p["epochs"]) == ("finished", "tiny", "pretrain", 2)
    assert p["step"] == p["total_steps"] == 2 * (images // 128)
    assert p["checkpoint"]["step"] == p["total_steps"] and p["images_per_s"] > 0 and p["healthy"]
    e = status(out / "eval")  # the eval's metrics lines count optimizer steps, as its checkpoints do
    steps = e["total_steps"] // 2
    assert (e["state"], e["kind"], e["step"], e["epochs"]) == ("finished", "eval", 2 * steps, 2) and steps >= 1
    assert checkpoint.step_of(checkpoint.latest(str(out / "eval"))) == e["step"]
    assert e["knn_top1"] is not None and e["healthy"]


def test_watch_rides_out_an_api_server_that_stops_answering(kube, tmp_path):
    submit(tmp_path, "pytorchjob")
    kube.drops = [False, True, True, True, True]  # refresh 2: one request and the client's 3 retries hang up
    result = barlow("status", "demo", "-b", "pytorchjob", "--watch", "--interval", "0", "--count", "3")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith(f"error: cannot reach the Kubernetes API at {kube.url}: ")
    assert [fields(s)["phase"] for s in result.stdout.split("\n\n")] == ["Pending", "Pending"]  # refreshes 1 and 3
    first = barlow("status", "demo", "-b", "pytorchjob", "--context", "nope", "--watch", "--interval", "0", "--count", "2")
    assert first.exit_code == 1 and first.stdout == ""  # a first refresh that fails ends the watch
    assert len(first.stderr.strip().splitlines()) == 1 and "nope" in first.stderr


def test_status_in_the_cli_image_shows_the_job_and_reads_the_runs_files(kube, tmp_path, monkeypatch):
    """The CLI image (no torch; fsspec and s3fs, issue 22): a job's status and its pods' reasons, and the run's files
    read where they lie; what it cannot read (no S3 credentials here) is said in one line."""
    from test_cli_image import barlow_without_torch

    b = backend.get("pytorchjob")
    submit(tmp_path, "pytorchjob")
    pod = add_pod(kube, b, "master", fake_kube.oom_killed(b.container, IMAGE))
    env = {"KUBECONFIG": os.environ["KUBECONFIG"]}
    out = barlow_without_torch("status", "demo", "-b", "pytorchjob", env=env)
    assert out.returncode == 0, out.stderr
    assert f"pod:       {pod} Failed - OOMKilled (exit code 137)" in out.stdout.splitlines()
    joined = barlow_without_torch("status", "-f", str(tmp_path / "spec.yaml"), env={**env, "AWS_ACCESS_KEY_ID": "",
                                                                                    "AWS_SECRET_ACCESS_KEY": ""})
    assert joined.returncode == 0, joined.stderr
    (line,) = [x for x in joined.stdout.splitlines() if x.startswith("progress:")]
    assert line.startswith("progress:  unavailable: ") and "S3 credentials" in line and "fsspec" not in line, line
    run = str(tmp_path / "run")
    write_run(run, monkeypatch, steps(10, 20))
    folder = barlow_without_torch("status", run)
    assert folder.returncode == 0, folder.stderr
    assert "step: 20 / 100 (20.0 %) epoch 2.00 of 10" in [" ".join(x.split()) for x in folder.stdout.splitlines()]


def test_the_rank_monitor_shows_in_status(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    clock = write_run(out, monkeypatch, [*steps(10, 20), (20, {"rankme_features": 51.2, "rankme_projector": 40.04,
                                                                "constant_dims": 0.03, "collapse_below": 6.4})])
    rows = dict(progress.lines(progress.read(out, now=clock.t)))
    assert rows["rank"] == "RankMe 51.2 features, 40.0 projector; 3 % near-constant dims"


def test_status_shows_what_the_run_reported_to_the_trainer(kube, tmp_path):
    submit(tmp_path, "trainjob")
    reported = {"progressPercentage": 42, "estimatedRemainingSeconds": 3600, "lastUpdatedTime": "2026-12-06T02:00:00Z",
                "metrics": [{"name": "loss", "value": "812.4"}, {"name": "images_per_s", "value": "2950"}]}
    kube.scripted["demo"] = [{"status": {"conditions": [], "trainerStatus": reported}}]
    result = barlow("status", "demo", "-b", "trainjob")
    assert result.exit_code == 0, result.stderr
    assert fields(result.stdout)["trainer"] == ("42 %, 3600 s left; loss 812.4, images_per_s 2950 "
                                                "(at 2026-12-06T02:00:00Z)")
    kube.scripted["demo"] = [{"status": {"conditions": [], "trainerStatus": reported}}]
    doc = json.loads(barlow("status", "demo", "-b", "trainjob", "-o", "json").stdout)
    assert doc["job"]["trainer_status"] == reported


def test_a_job_name_that_is_a_run_folder_here_says_how_to_ask_for_the_folder(kube, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run("run", monkeypatch, steps(10))
    result = barlow("status", "run")
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: no ") and line.endswith(
        "(run is read as a job name; for the run folder here, write: barlow status ./run)"), line
    assert barlow("status", "./run").exit_code == 0


def test_a_monitor_s_keys_show_in_status_without_a_row_written_for_them(tmp_path, monkeypatch):
    """The keys a run's monitors report (run.json's monitor_keys) show whatever they are: one row each where they have
    no row of their own, and the JSON's `monitors`; a key no monitor declares shows nowhere."""
    out = str(tmp_path / "run")
    clock = write_run(out, monkeypatch, steps(10, 20, probe_top1=41.5, toy_score=0.25, undeclared=7.0),
                      monitor_keys=("probe_top1", "toy_score"))
    p = progress.read(out, now=clock.t)
    assert (p.probe_top1, p.monitors) == (41.5, {"toy_score": 0.25})
    shown = dict(progress.lines(p, clock.t))
    assert (shown["probe"], shown["toy_score"]) == ("top-1 41.5 % (online linear probe)", "0.25")
    assert "undeclared" not in shown
    result = barlow("status", out)
    assert result.exit_code == 0, result.stderr
    assert fields(result.stdout)["toy_score"] == "0.25"
    doc = json.loads(barlow("status", out, "-o", "json").stdout)
    assert doc["progress"]["monitors"] == {"toy_score": 0.25}
