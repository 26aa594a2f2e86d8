"""barlow submit/status/wait/logs/delete/list for a TrainJob (Kubeflow Trainer v2), and Kueue's suspended state on
both backends, against the local stand-in of the Kubernetes API (tests/support/fake_kube.py): real HTTP, recorded requests."""

from __future__ import annotations

import pytest
import yaml
from cluster_specs import submitted
from fake_kube import FakeKube
from typer.testing import CliRunner

from barlow.cli import app
from barlow.launch import backend
from barlow.launch.render import render
from barlow.spec import parse_spec

TRAINJOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/barlow/trainjobs"
PYTORCHJOBS = "/apis/kubeflow.org/v1/namespaces/barlow/pytorchjobs"
SECRET = "sentinel-secret-value-never-sent"
SPEC = submitted("trainjob", queue="gpu-team")
# Status bodies as Trainer v2.3 and Kueue write them (conditions Suspended, Complete, Failed; jobsStatus per job).
QUEUED = {"spec": {"suspend": True}, "status": {"conditions": [
    {"type": "Suspended", "status": "True", "reason": "Suspended", "message": "Workload is waiting for quota"}]}}
ADMITTED = {"spec": {"suspend": False}, "status": {
    "conditions": [{"type": "Suspended", "status": "False", "reason": "Resumed", "message": "resumed"}],
    "jobsStatus": [{"name": "node", "active": 2, "ready": 2, "succeeded": 0, "failed": 0, "suspended": 0}]}}
COMPLETE = {"status": {"conditions": [
    {"type": "Suspended", "status": "False", "reason": "Resumed", "message": ""},
    {"type": "Complete", "status": "True", "reason": "JobsCompleted", "message": "TrainJob is completed"}]}}
FAILED = {"status": {"conditions": [
    {"type": "Failed", "status": "True", "reason": "JobsFailed", "message": "jobset demo failed: node-0 exit code 1"}]}}


def spec_file(tmp_path, **cluster):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "cluster": {**SPEC["cluster"], **cluster}}))
    return path


def barlow(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_submit_creates_the_rendered_trainjob_with_the_queue_label(kube, tmp_path, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, SECRET)
    result = barlow("submit", "pretrain", spec_file(tmp_path))
    assert result.exit_code == 0, result.stderr
    assert "trainjob demo in namespace barlow: created" in result.stdout
    assert "watch it: barlow status demo -n barlow   (" in result.stdout  # trainjob is the default backend: no -b
    policies = "/apis/networking.k8s.io/v1/namespaces/barlow/networkpolicies"
    assert [(r.method, r.path) for r in kube.requests] == [
        ("GET", f"{TRAINJOBS}/demo"), ("GET", "/apis/trainer.kubeflow.org/v1alpha1"), ("GET", f"{policies}/demo-peers"),
        ("POST", policies), ("POST", TRAINJOBS), ("PATCH", f"{policies}/demo-peers")]
    body = kube.calls("POST")[-1].body
    assert body == render(parse_spec(SPEC))[1]
    assert body["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team"
    assert SECRET not in str([r.body for r in kube.requests]) + result.stdout + result.stderr
    again = barlow("submit", "pretrain", spec_file(tmp_path))
    assert again.exit_code == 0 and "already submitted" in again.stdout


def test_a_pipeline_follow_up_is_owned_by_the_trainjob(kube, tmp_path):
    result = barlow("submit", "pipeline", spec_file(tmp_path))
    assert result.exit_code == 0, result.stderr
    job = kube.stored("trainjobs", group="trainer.kubeflow.org/v1alpha1")["demo"]
    follow = kube.stored("jobs", group="batch/v1")["demo-follow-up"]
    assert follow["metadata"]["ownerReferences"] == [{"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
                                                      "name": "demo", "uid": job["metadata"]["uid"]}]


def test_submit_eval_after_a_trainjob_waits_for_complete(kube, tmp_path, monkeypatch):
    assert barlow("submit", "pretrain", spec_file(tmp_path)).exit_code == 0
    kube.scripted["demo"] = [QUEUED, ADMITTED, COMPLETE]
    result = barlow("submit", "eval", spec_file(tmp_path), "--after", "demo", "--poll", "0.01")
    assert result.exit_code == 0, result.stderr
    assert [line.split(":")[1].split(" - ")[0].strip() for line in result.stdout.splitlines()
            if line.startswith("trainjob demo:")] == ["Queued", "Running", "Complete"]
    assert "demo-eval" in kube.stored("trainjobs", group="trainer.kubeflow.org/v1alpha1")


@pytest.mark.parametrize("final, code, line", [
    (COMPLETE, 0, "trainjob demo: Complete - TrainJob is completed"),
    (FAILED, 1, "error: trainjob demo failed: jobset demo failed: node-0 exit code 1"),
])
def test_wait_keeps_waiting_while_queued_and_ends_on_complete_or_failed(kube, tmp_path, final, code, line):
    assert barlow("submit", "pretrain", spec_file(tmp_path)).exit_code == 0
    kube.scripted["demo"] = [QUEUED, QUEUED, QUEUED, ADMITTED, final]
    result = barlow("wait", "demo", "-b", "trainjob", "--poll", "0.01")
    assert result.exit_code == code, result.stderr
    assert "trainjob demo: Queued - Workload is waiting for quota" in result.stdout
    assert line in (result.stdout + result.stderr)
    assert len(kube.calls("GET", f"{TRAINJOBS}/demo")) == 1 + 5  # submit's check, then one read per poll


@pytest.mark.parametrize("backend_name, spec_change, path", [
    ("trainjob", {"suspend": True}, TRAINJOBS),
    ("pytorchjob", {"runPolicy": {"suspend": True}}, PYTORCHJOBS),  # Kueue suspends a PyTorchJob through runPolicy
])
def test_status_shows_a_job_suspended_by_kueue_as_queued(kube, tmp_path, backend_name, spec_change, path):
    assert barlow("submit", "pretrain", spec_file(tmp_path, backend=backend_name)).exit_code == 0
    kube.scripted["demo"] = [{"spec": spec_change, "status": None}]
    result = barlow("status", "demo", "--backend", backend_name)
    assert result.exit_code == 0, result.stderr
    assert "phase:     Queued" in result.stdout
    assert "suspended until its queue admits it" in result.stdout
    assert f"{path}/demo" in [r.path for r in kube.requests[1:]]  # read after submit's own check


def test_status_shows_a_trainjob_s_jobs(kube, tmp_path):
    assert barlow("submit", "pretrain", spec_file(tmp_path)).exit_code == 0
    kube.scripted["demo"] = [ADMITTED]
    result = barlow("status", "demo", "-b", "trainjob")
    assert "phase:     Running" in result.stdout
    assert "replicas:  node active 2, ready 2, succeeded 0, failed 0, suspended 0" in result.stdout


def test_list_and_delete_trainjobs(kube, tmp_path):
    assert barlow("submit", "pretrain", spec_file(tmp_path)).exit_code == 0
    listed = barlow("list", "-b", "trainjob")
    assert listed.exit_code == 0 and listed.stdout.splitlines()[1].split()[:3] == ["demo", "pretrain", "Pending"]
    assert kube.requests[-1].query["labelSelector"] == "app.kubernetes.io/managed-by=barlow"
    assert "no barlow pytorchjobs in namespace barlow" in barlow("list", "-b", "pytorchjob").stdout  # the other backend's
    deleted = barlow("delete", "demo", "-b", "trainjob")
    assert deleted.exit_code == 0 and "trainjob demo in namespace barlow: deleted" in deleted.stdout
    assert (kube.requests[-1].method, kube.requests[-1].path) == ("DELETE", f"{TRAINJOBS}/demo")
    assert kube.stored("trainjobs", group="trainer.kubeflow.org/v1alpha1") == {}
    gone = barlow("delete", "demo", "-b", "trainjob")
    assert gone.exit_code == 1 and "error: no trainjob demo in namespace 'barlow'" in gone.stderr


def test_logs_of_a_trainjob_node_select_its_jobset_pod(kube, tmp_path):
    assert barlow("submit", "pretrain", spec_file(tmp_path)).exit_code == 0
    for index in (0, 1):
        kube.add_pod("barlow", f"demo-node-0-{index}-x", {"jobset.sigs.k8s.io/jobset-name": "demo",
                                                        "jobset.sigs.k8s.io/replicatedjob-name": "node",
                                                        "batch.kubernetes.io/job-completion-index": str(index)},
                     f"hello from node {index}\n")
    result = barlow("logs", "demo", "-b", "trainjob", "--replica", "node-1")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "hello from node 1\n"
    log_call = kube.requests[-1]
    assert log_call.path.endswith("/pods/demo-node-0-1-x/log") and log_call.query["container"] == "node"
    bad = barlow("logs", "demo", "-b", "trainjob", "--replica", "worker-0")
    assert bad.exit_code == 1 and "--replica must be master or node-N" in bad.stderr


def test_a_missing_trainer_crd_is_one_clear_line(tmp_path, monkeypatch):
    with FakeKube(trainer=False) as fake:
        monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        result = barlow("submit", "pretrain", spec_file(tmp_path))
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {backend.get('trainjob').crd_missing}"


def test_submit_without_an_image_says_how_to_set_one(kube, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "cluster": {k: v for k, v in SPEC["cluster"].items() if k != "image"}}))
    result = barlow("submit", "pretrain", path)
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: cluster.image is not set: build and push the training image (make image")
    assert kube.calls("POST") == []


@pytest.mark.parametrize("where, field", [("spec.trainer", "numProcPerNodes"), ("spec", "suspendd")])
def test_a_field_the_installed_crd_does_not_know_is_refused_not_dropped(kube, tmp_path, monkeypatch, where, field):
    # as a newer barlow against an older Trainer: the API server would drop the field with a warning nobody reads;
    # submit asks for fieldValidation=Strict, and the (fake) API server refuses it, naming the field
    import fake_kube

    from barlow.launch import cluster

    if not (fake_kube.SCHEMAS / fake_kube.CRD_FILES["trainjobs"]).exists():
        pytest.skip(f"{fake_kube.SCHEMAS} has no TrainJob CRD: the fake cannot check fields")

    def render_with_extra(spec, what=None):
        docs = render(spec, what)
        node = docs[1]
        for key in where.split("."):
            node = node.setdefault(key, {})
        node[field] = 1
        return docs
    monkeypatch.setattr(cluster, "render", render_with_extra)
    result = barlow("submit", "pretrain", spec_file(tmp_path))
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line == (f'error: the API server rejected trainjob demo: TrainJob in version "v1alpha1" cannot be handled '
                    f'as a TrainJob: strict decoding error: unknown field "{where}.{field}"')
    assert kube.stored("trainjobs", group="trainer.kubeflow.org/v1alpha1") == {}
