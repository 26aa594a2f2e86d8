"""barlow submit/status/logs/wait/delete/list against a local stand-in of the Kubernetes API (tests/support/fake_kube.py).

The real kubernetes client talks HTTP to 127.0.0.1 through a kubeconfig written per test; the assertions are on
the exact paths, verbs, queries and bodies the server received, and on the one-line errors users see.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings

import pytest
import yaml
from cluster_specs import submitted
from fake_kube import TOKEN, FakeKube
from typer.testing import CliRunner

from barlow.cli import app
from barlow.cli.cluster import _cluster_warnings
from barlow.errors import EXIT_WAIT_TIMEOUT
from barlow.launch import backend
from barlow.launch.manifest import LABEL_HASH
from barlow.launch.render import render
from barlow.spec import dump_spec, parse_spec

JOBS = "/apis/kubeflow.org/v1/namespaces/barlow/pytorchjobs"
BATCH = "/apis/batch/v1/namespaces/barlow/jobs"
POLICIES = "/apis/networking.k8s.io/v1/namespaces/barlow/networkpolicies"
SPEC = submitted("pytorchjob")


@pytest.fixture
def kube(tmp_path, monkeypatch):
    with FakeKube() as fake:
        monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.delenv("BARLOW_SPEC", raising=False)
        monkeypatch.delenv("BARLOW_NAMESPACE", raising=False)
        monkeypatch.setenv("BARLOW_BACKEND", "pytorchjob")  # status, wait, logs, delete, list: this file's backend
        yield fake


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def barlow(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_submit_creates_the_rendered_job_with_the_kubeconfig_credentials(kube, spec_file):
    result = barlow("submit", "pretrain", spec_file)
    assert result.exit_code == 0, result.stderr
    assert "pytorchjob demo in namespace barlow: created" in result.stdout
    assert [(r.method, r.path) for r in kube.requests] == [
        ("GET", f"{JOBS}/demo"),  # is the name taken?
        ("GET", "/apis/kubeflow.org/v1"),  # a 404 for the job, not for the whole API: the CRD is there
        ("GET", f"{POLICIES}/demo-peers"),
        ("POST", POLICIES),  # the job's NetworkPolicy first: no pod of the job starts without it
        ("POST", JOBS),
        ("PATCH", f"{POLICIES}/demo-peers"),  # then owned by the job
    ]
    policy, post = kube.calls("POST")
    assert [policy.body, post.body] == render(parse_spec(SPEC))
    assert "dryRun" not in post.query
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in kube.requests)
    assert list(kube.stored()) == ["demo"]


def test_resubmitting_the_same_spec_creates_nothing(kube, spec_file):
    assert barlow("submit", "pretrain", spec_file).exit_code == 0
    again = barlow("submit", "pretrain", spec_file)
    assert again.exit_code == 0, again.stderr
    assert "pytorchjob demo in namespace barlow: already submitted" in again.stdout
    assert "networkpolicy demo-peers in namespace barlow: already submitted" in again.stdout
    assert len(kube.calls("POST")) == 2 and len(kube.calls("PATCH")) == 1


def test_same_name_with_another_spec_is_a_clear_error(kube, spec_file, tmp_path):
    assert barlow("submit", "pretrain", spec_file).exit_code == 0
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**SPEC, "optim": {**SPEC["optim"], "epochs": 20}}))
    result = barlow("submit", "pretrain", changed)
    assert result.exit_code == 1
    line = one_error_line(result)
    old, new = parse_spec(SPEC).spec_hash(), parse_spec(yaml.safe_load(changed.read_text())).spec_hash()
    assert f"pytorchjob demo already exists in namespace 'barlow' with a different spec (hash {old}, this spec {new})" in line
    assert "barlow delete demo" in line
    assert len(kube.calls("POST")) == 2  # the first submit's policy and job


def test_dry_run_asks_the_server_to_validate_without_creating(kube, spec_file):
    result = barlow("submit", "pretrain", spec_file, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "valid (server dry run; nothing created)" in result.stdout
    strict = {"dryRun": "All", "fieldValidation": "Strict"}
    assert [(p.path, p.query) for p in kube.calls("POST")] == [(POLICIES, strict), (JOBS, strict)]
    assert kube.stored() == {} and kube.stored("networkpolicies", group="networking.k8s.io/v1") == {}
    assert not kube.calls("PATCH")


def test_namespace_option_moves_the_job_and_the_spec_it_carries(kube, spec_file):
    kube.namespaces.add("team-a")
    result = barlow("submit", "pretrain", spec_file, "--namespace", "team-a")
    assert result.exit_code == 0, result.stderr
    policy, post = kube.calls("POST")
    assert policy.path == "/apis/networking.k8s.io/v1/namespaces/team-a/networkpolicies"
    assert post.path == "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs"
    assert post.body["metadata"]["namespace"] == "team-a"
    env = post.body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    carried = parse_spec(yaml.safe_load(next(e["value"] for e in env if e["name"] == "BARLOW_SPEC")))
    assert carried.cluster.namespace == "team-a"
    assert post.body["metadata"]["labels"][LABEL_HASH] == carried.spec_hash()


def test_submit_pipeline_creates_pretrain_then_a_follow_up_owned_by_it(kube, spec_file):
    result = barlow("submit", "pipeline", spec_file)
    assert result.exit_code == 0, result.stderr
    assert "pytorchjob demo in namespace barlow: created" in result.stdout
    assert "job demo-follow-up in namespace barlow: created" in result.stdout
    policy, pretrain, follow = kube.calls("POST")
    assert (policy.path, pretrain.path, follow.path) == (POLICIES, JOBS, BATCH)
    expected = render(parse_spec(SPEC), "pipeline")[2]
    owner = follow.body["metadata"].pop("ownerReferences")
    assert follow.body == expected
    assert owner == [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": "demo",
                      "uid": kube.stored()["demo"]["metadata"]["uid"]}]
    again = barlow("submit", "pipeline", spec_file)
    assert again.exit_code == 0 and again.stdout.count("already submitted") == 3
    assert len(kube.calls("POST")) == 3


def test_follow_up_submits_the_eval_once_pretrain_succeeds(kube, spec_file, monkeypatch):
    assert barlow("submit", "pretrain", spec_file).exit_code == 0
    kube.phases["demo"] = ["Created", "Running", "Running", "Succeeded"]
    eval_spec = parse_spec(SPEC).eval_spec()
    monkeypatch.setenv("BARLOW_SPEC", dump_spec(eval_spec))  # as the follow-up Job passes it
    result = barlow("submit", "eval", "--after", "demo", "--poll", "0.01")
    assert result.exit_code == 0, result.stderr
    assert [line.split(": ")[1].split(" ")[0] for line in result.stdout.splitlines() if line.startswith("pytorchjob demo:")] == [
        "Created", "Running", "Succeeded"]
    assert "pytorchjob demo-eval in namespace barlow: created" in result.stdout
    assert [p.body for p in kube.calls("POST")[-2:]] == render(eval_spec)  # the eval's policy, then the eval


def test_follow_up_does_not_start_the_eval_after_a_failed_pretrain(kube, spec_file, monkeypatch):
    assert barlow("submit", "pretrain", spec_file).exit_code == 0
    kube.phases["demo"] = ["Running", "Failed"]
    monkeypatch.setenv("BARLOW_SPEC", dump_spec(parse_spec(SPEC).eval_spec()))
    result = barlow("submit", "eval", "--after", "demo", "--poll", "0.01")
    assert result.exit_code == 1
    assert "pytorchjob demo failed: job failed; the eval is not started" in one_error_line(result)
    assert len(kube.calls("POST")) == 2  # the pretrain's policy and job


def test_status_shows_phase_replicas_and_hash(kube, spec_file):
    assert barlow("submit", "pretrain", spec_file).exit_code == 0
    kube.set_conditions("demo", "barlow", "Created", "Running", message="PyTorchJob demo is running.")
    result = barlow("status", "demo")
    assert result.exit_code == 0, result.stderr
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert {k: v.strip() for k, v in fields.items() if k in ("name", "phase", "kind", "replicas", "spec hash", "message")} == {
        "name": "demo", "phase": "Running", "kind": "pretrain", "replicas": "Master active 1",
        "spec hash": parse_spec(SPEC).spec_hash(), "message": "PyTorchJob demo is running."}
    assert [(r.method, r.path) for r in kube.requests[-2:]] == [("GET", f"{JOBS}/demo"), ("GET", "/api/v1/namespaces/barlow/pods")]


@pytest.mark.parametrize("final, code", [("Succeeded", 0), ("Failed", 1)])
def test_wait_reports_each_phase_and_exits_by_outcome(kube, spec_file, final, code):
    assert barlow("submit", "pretrain", spec_file).exit_code == 0
    kube.phases["demo"] = ["Created", "Running", "Running", final]
    result = barlow("wait", "demo", "--poll", "0.01")
    assert result.exit_code == code, result.stderr
    assert [line.split()[2] for line in result.stdout.splitlines()] == ["Created", "Running", final]
    if code:
        assert one_error_line(result) == "error: pytorchjob demo failed: job failed"


def test_wait_rides_out_an_api_server_that_stops_answering(kube, spec_file):
    assert barlow("submit", "pretrain", spec_file).exit_code == 0
    kube.phases["demo"] = ["Running", "Succeeded"]
    kube.drops = [False] + [True] * 8  # after the first answer, two polls' worth of hang-ups (the client retries each 3x)
    result = barlow("wait", "demo", "--poll", "0.01")
    assert result.exit_code == 0, result.stderr
    assert [line.split()[2] for line in result.stdout.splitlines()] == ["Running", "Succeeded"]
    assert kube.drops == []


def test_wait_gives_up_when_the_api_server_never_answered(kube, spec_file):
    assert barlow("submit", "pretrain", spec_file).exit_code == 0
    kube.drops = [True] * 4  # one request and the client's 3 retries
    result = barlow("wait", "demo", "--poll", "0.01")
    assert result.exit_code == 3
    assert one_error_line(result).startswith(f"error: cannot reach the Kubernetes API at {kube.url}: ")
    assert kube.drops == []


def test_wait_times_out_with_the_last_phase(kube, spec_file):
    assert barlow("submit", "pretrain", spec_file).exit_code == 0
    kube.set_conditions("demo", "barlow", "Created", "Running")
    result = barlow("wait", "demo", "--poll", "0.01", "--timeout", "0.05")
    assert result.exit_code == EXIT_WAIT_TIMEOUT != 1  # not the failed job's code
    assert one_error_line(result) == "error: timed out after 0.05s waiting for pytorchjob demo (phase Running)"


OPERATOR_LABELS = "training.kubeflow.org/job-name", "training.kubeflow.org/replica-type", "training.kubeflow.org/replica-index"


@pytest.mark.parametrize("replica, pod", [("master", "demo-master-0"), ("worker-1", "demo-worker-1")])
@pytest.mark.parametrize("follow", [False, True])
def test_logs_read_the_training_container_of_the_chosen_replica(kube, spec_file, replica, pod, follow):
    assert barlow("submit", "pretrain", spec_file).exit_code == 0
    for rtype, index in [("master", 0), ("worker", 0), ("worker", 1)]:
        name = f"demo-{rtype}-{index}"
        labels = dict(zip(OPERATOR_LABELS, ("demo", rtype, str(index)), strict=True))
        kube.add_pod("barlow", name, labels, f"{name} step 1\n{name} step 2\n")
    result = barlow("logs", "demo", "--replica", replica, *(["--follow"] if follow else []))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{pod} step 1\n{pod} step 2\n"
    listing, read = kube.calls("GET", "/api/v1")
    rtype, _, index = replica.partition("-")
    assert listing.path == "/api/v1/namespaces/barlow/pods"
    assert listing.query["labelSelector"] == f"training.kubeflow.org/job-name=demo,training.kubeflow.org/replica-type={rtype}," \
                                             f"training.kubeflow.org/replica-index={index or 0}"
    assert read.path == f"/api/v1/namespaces/barlow/pods/{pod}/log"
    assert read.query["container"] == "pytorch"
    assert read.query["follow"] == str(follow)  # what the python client sends; the API server parses it as a bool


@pytest.mark.parametrize("args, message", [
    (["--replica", "chief"], "error: --replica must be master or worker-N (N from 0), not 'chief'"),
    ([], "error: no pod yet for replica master of pytorchjob demo (phase Pending)"),
])
def test_logs_errors(kube, spec_file, args, message):
    assert barlow("submit", "pretrain", spec_file).exit_code == 0
    result = barlow("logs", "demo", *args)
    assert result.exit_code == 1 and one_error_line(result) == message


def test_delete_removes_the_job_in_the_background_and_then_it_is_gone(kube, spec_file):
    assert barlow("submit", "pretrain", spec_file).exit_code == 0
    result = barlow("delete", "demo")
    assert result.exit_code == 0, result.stderr
    assert "pytorchjob demo in namespace barlow: deleted" in result.stdout
    (deletion,) = kube.calls("DELETE")
    assert deletion.path == f"{JOBS}/demo" and deletion.query == {"propagationPolicy": "Background"}
    assert kube.stored() == {}
    again = barlow("delete", "demo")
    assert again.exit_code == 1 and one_error_line(again) == "error: no pytorchjob demo in namespace 'barlow'"


def test_list_shows_barlows_jobs_only(kube, spec_file, tmp_path):
    assert barlow("submit", "pretrain", spec_file).exit_code == 0
    kube.stored()["someone-else"] = {"metadata": {"name": "someone-else", "labels": {}}}
    result = barlow("list")
    assert result.exit_code == 0, result.stderr
    (listing,) = kube.calls("GET", JOBS)[-1:]
    assert listing.path == JOBS and listing.query == {"labelSelector": "app.kubernetes.io/managed-by=barlow"}
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert rows == [["demo", "pretrain", "Pending", "2026-01-01T00:00:00Z", parse_spec(SPEC).spec_hash()]]


@pytest.mark.timeout(30)
def test_a_foreign_warning_in_a_cluster_command_is_shown_once_and_the_command_returns(recwarn):
    with _cluster_warnings():
        warnings.warn("twice the same", UserWarning, stacklevel=1)
        warnings.warn("twice the same", UserWarning, stacklevel=1)
    assert [str(w.message) for w in recwarn] == ["twice the same"]


@pytest.mark.timeout(120)
def test_a_cluster_with_a_self_signed_certificate_answers_with_one_warning(tmp_path, spec_file):
    """insecure-skip-tls-verify (kind, self-signed on-prem clusters): urllib3 warns on every request; the commands
    return, and say it once."""
    with FakeKube(tls_dir=tmp_path) as fake:
        env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "BARLOW_SPEC", "BARLOW_NAMESPACE")}
        env |= {"KUBECONFIG": str(fake.kubeconfig(tmp_path / "kubeconfig")), "BARLOW_BACKEND": "pytorchjob"}
        submit, listing = (subprocess.run([sys.executable, "-m", "barlow.cli", *args], env=env, capture_output=True,
                                          text=True, timeout=100) for args in (["submit", "pretrain", str(spec_file)], ["list"]))
        assert len(fake.calls("POST", JOBS)) == 1
    assert submit.returncode == 0, submit.stderr
    assert listing.returncode == 0 and listing.stdout.splitlines()[1].split()[0] == "demo", listing.stderr
    for result in (submit, listing):
        assert result.stderr.count("InsecureRequestWarning") == 1, result.stderr


@pytest.mark.parametrize("args", [
    ["submit", "pretrain", "SPEC"], ["status", "demo"], ["logs", "demo"], ["delete", "demo"], ["list"], ["wait", "demo"],
])
def test_missing_crd_is_named(kube, spec_file, args):
    kube.crd = False
    result = barlow(*[str(spec_file) if a == "SPEC" else a for a in args])
    assert result.exit_code == 1
    assert one_error_line(result) == f"error: {backend.get('pytorchjob').crd_missing}"
    assert not kube.calls("POST")


@pytest.mark.parametrize("args, verb", [
    (["submit", "pretrain", "SPEC"], "get"), (["status", "demo"], "get"), (["delete", "demo"], "delete"), (["list"], "get"),
])
def test_forbidden_says_who_cannot_do_what(kube, spec_file, args, verb):
    kube.forbidden = True
    result = barlow(*[str(spec_file) if a == "SPEC" else a for a in args])
    assert result.exit_code == 1
    assert one_error_line(result) == (f'error: forbidden: pytorchjobs.kubeflow.org is forbidden: User "alice" cannot {verb} '
                                      f'resource "pytorchjobs" in the namespace "barlow" '
                                      "(ask a cluster admin to bind the Role in k8s/base/role-submitter.yaml "
                                      "in namespace 'barlow')")


def test_missing_namespace_is_named(kube, spec_file):
    result = barlow("submit", "pretrain", spec_file, "-n", "nowhere")
    assert result.exit_code == 1
    assert one_error_line(result) == ("error: namespace 'nowhere' does not exist: create it (kubectl apply -k k8s/base) "
                                      "or pass --namespace")


def test_no_cluster_configured(tmp_path, monkeypatch, spec_file):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    result = barlow("submit", "pretrain", spec_file)
    assert result.exit_code == 1
    assert one_error_line(result) == (f"error: no cluster configured: no kubeconfig at {tmp_path / 'absent'} and not running "
                                      "in a pod (point KUBECONFIG at your cluster's config)")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_context_option_picks_the_cluster(tmp_path, monkeypatch, spec_file):
    dead = f"http://127.0.0.1:{_closed_port()}"
    with FakeKube() as fake:
        monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "kc", {"dead": dead}, current="dead")))
        unreachable = barlow("status", "demo")
        assert unreachable.exit_code == 3  # retryable, unlike 1
        assert one_error_line(unreachable).startswith(f"error: cannot reach the Kubernetes API at {dead}: ")
        assert barlow("submit", "pretrain", spec_file, "--context", "fake").exit_code == 0
        assert list(fake.stored()) == ["demo"]
        unknown = barlow("status", "demo", "--context", "nope")
        assert unknown.exit_code == 1 and "nope" in one_error_line(unknown)
        assert one_error_line(unknown).startswith(f"error: kubeconfig {tmp_path / 'kc'}: ")


@pytest.mark.parametrize("target, kind, message", [
    ("pretrain", "eval", "kind is 'eval'; `pretrain` needs a pretrain spec"),
    ("pipeline", "eval", "kind is 'eval'; `pipeline` needs a pretrain spec"),
])
def test_target_and_spec_kind_must_agree_before_any_request(kube, tmp_path, target, kind, message):
    path = tmp_path / "eval.yaml"
    path.write_text(dump_spec(parse_spec(SPEC).eval_spec()))
    result = barlow("submit", target, path)
    assert result.exit_code == 2 and message in one_error_line(result)
    assert kube.requests == []


def test_a_pipeline_whose_eval_cannot_run_is_refused_before_any_post(kube, tmp_path):
    path = tmp_path / "no-val.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "data": {"train": "s3://bucket/train"}}))
    result = barlow("submit", "pipeline", path)
    assert result.exit_code == 2
    assert one_error_line(result) == "error: the follow-up eval: data.val: an eval needs validation images"
    assert kube.requests == []
