"""Each training job's NetworkPolicy (`<job>-peers`): rendered before the job on both backends, selecting exactly the
pods the job's templates label, schema-valid; created by `barlow submit` before the job, then owned by it; deleted
again when the job is refused; resubmits and dry runs write nothing more. Against the local API server of
tests/support/fake_kube.py through the real kubernetes client. k8s/base's default deny and RBAC: tests/launch/test_k8s_manifests.py.
"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from cluster_specs import SPECS, TRAINJOB_SPECS, spec, submitted
from typer.testing import CliRunner

from barlow.cli import app
from barlow.launch.manifest import PEER_LABELS, RenderError, labels
from barlow.launch.render import network_policy_name, render
from barlow.spec import dump_spec, parse_spec, set_path

# eval-kueue on a PyTorchJob warns that Kueue >= 0.19 leaves PyTorchJobs alone (tests/launch/test_launch_pytorchjob.py)
pytestmark = pytest.mark.filterwarnings("ignore::barlow.launch.checks.ClusterWarning")
ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = kubernetes_validate.latest_version()
GROUP = "networking.k8s.io/v1"
POLICIES = f"/apis/{GROUP}/namespaces/barlow/networkpolicies"
JOBS = {"pytorchjob": "/apis/kubeflow.org/v1/namespaces/barlow/pytorchjobs",
        "trainjob": "/apis/trainer.kubeflow.org/v1alpha1/namespaces/barlow/trainjobs"}
STORE = {"pytorchjob": ("pytorchjobs", "kubeflow.org/v1"), "trainjob": ("trainjobs", "trainer.kubeflow.org/v1alpha1")}
KINDS = {"pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}
BACKENDS = list(JOBS)
# (backend, spec key, what barlow render is asked for)
RENDERS = [(b, key, what) for b, specs in (("pytorchjob", SPECS), ("trainjob", TRAINJOB_SPECS))
           for key in specs for what in (["pretrain", "eval", "pipeline"] if specs[key]["kind"] == "pretrain" else ["eval"])]


def pod_template_labels(job: dict) -> list[dict[str, str]]:
    """The labels of every pod template of a rendered job: each PyTorchJob replica's (the operator keeps them on the
    pods), or the TrainJob's runtimePatches pod template's (Trainer strategic-merges it into the JobSet's pod template:
    pkg/runtime/core/trainingruntime.go, mergeRuntimePatches)."""
    if job["kind"] == "PyTorchJob":
        return [rs["template"]["metadata"]["labels"] for rs in job["spec"]["pytorchReplicaSpecs"].values()]
    return [rj["template"]["spec"]["template"]["metadata"]["labels"] for p in job["spec"]["runtimePatches"]
            for rj in p["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]]


@pytest.mark.parametrize("backend, key, what", RENDERS)
def test_each_job_comes_after_a_policy_that_admits_exactly_its_pods(backend, key, what):
    s = spec(key, SPECS if backend == "pytorchjob" else TRAINJOB_SPECS)
    docs = render(s, what)
    policy, job = docs[:2]
    assert [d["kind"] for d in docs] == ["NetworkPolicy", KINDS[backend], *(["Job"] if what == "pipeline" else [])]
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    assert policy["metadata"]["name"] == f"{job['metadata']['name']}-peers"
    assert policy["metadata"]["namespace"] == job["metadata"]["namespace"]
    selector = policy["spec"]["podSelector"]
    assert set(selector) == {"matchLabels"}
    for pod_labels in pod_template_labels(job):  # a label changed on either side breaks this
        assert selector["matchLabels"] == {k: pod_labels[k] for k in PEER_LABELS}
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress stays open
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": selector}]}]  # any port: NCCL picks its own
    if what == "pipeline":  # the follow-up pod carries the eval's instance, not a training component
        follow_up = docs[2]["spec"]["template"]["metadata"]["labels"]
        ev_policy = render(s, "eval")[0]["spec"]["podSelector"]["matchLabels"]
        assert any(follow_up.get(k) != v for k, v in ev_policy.items())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label", PEER_LABELS)
def test_a_pod_patch_that_would_unselect_the_pods_is_refused(backend, label):
    data = set_path(SPECS["eval"] if backend == "pytorchjob" else TRAINJOB_SPECS["eval"], "cluster.pod_patch",
                    {"metadata": {"labels": {label: "elsewhere"}}})
    with pytest.raises(RenderError) as err:
        render(parse_spec(data))
    assert str(err.value).startswith(f"cluster.pod_patch: metadata.labels.{label}: barlow sets it to ")


SPEC = submitted("pytorchjob")  # each test sets its backend


def spec_file(tmp_path, backend: str, data: dict | None = None):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(set_path(data or SPEC, "cluster.backend", backend)))
    return path


def barlow(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def writes(kube) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in kube.requests if r.method != "GET"]


def stored_jobs(kube, backend: str) -> dict:
    plural, group = STORE[backend]
    return kube.stored(plural, group=group)


def policies(kube) -> dict:
    return kube.stored("networkpolicies", group=GROUP)


@pytest.mark.parametrize("backend", BACKENDS)
def test_submit_creates_the_policy_then_the_job_then_makes_the_job_its_owner(kube, tmp_path, backend):
    result = barlow("submit", "pretrain", spec_file(tmp_path, backend))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[:2] == ["networkpolicy demo-peers in namespace barlow: created",
                                              f"{backend} demo in namespace barlow: created"]
    assert writes(kube) == [("POST", POLICIES), ("POST", JOBS[backend]), ("PATCH", f"{POLICIES}/demo-peers")]
    policy_post, job_post = kube.calls("POST")
    assert [policy_post.body, job_post.body] == render(parse_spec(set_path(SPEC, "cluster.backend", backend)))
    job = stored_jobs(kube, backend)["demo"]
    (patch,) = kube.calls("PATCH")
    assert patch.headers["content-type"] == "application/merge-patch+json"
    owner = {"apiVersion": job["apiVersion"], "kind": KINDS[backend], "name": "demo", "uid": job["metadata"]["uid"]}
    assert patch.body["metadata"]["ownerReferences"] == [owner]  # deleting the job deletes its policy
    stored = policies(kube)["demo-peers"]
    assert stored["metadata"]["ownerReferences"] == [owner] and stored["spec"] == policy_post.body["spec"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_resubmitting_writes_nothing(kube, tmp_path, backend):
    path = spec_file(tmp_path, backend)
    assert barlow("submit", "pipeline", path).exit_code == 0
    before = len(writes(kube))
    again = barlow("submit", "pipeline", path)
    assert again.exit_code == 0, again.stderr
    assert again.stdout.count("already submitted") == 3  # the policy, the job, the follow-up
    assert len(writes(kube)) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dry_run_creates_nothing(kube, tmp_path, backend):
    result = barlow("submit", "pipeline", spec_file(tmp_path, backend), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("valid (server dry run; nothing created)") == 3
    dry = {"dryRun": "All", "fieldValidation": "Strict"}  # objects are checked as created, unknown fields refused
    assert [(r.method, r.path, r.query) for r in kube.calls("POST")] == [
        ("POST", POLICIES, dry), ("POST", JOBS[backend], dry), ("POST", "/apis/batch/v1/namespaces/barlow/jobs", dry)]
    assert not kube.calls("PATCH") and policies(kube) == {} and stored_jobs(kube, backend) == {}


@pytest.mark.parametrize("backend, refusal", [
    ("trainjob", "spec.runtimeRef: Invalid value: trainer.kubeflow.org/torch-distributed: specified trainingRuntime "
                 "must be created before the TrainJob is created"),
    ("pytorchjob", "spec.runPolicy.schedulingPolicy: Invalid value: this cluster runs no gang scheduler"),
])
def test_a_refused_job_leaves_no_policy_behind(kube, tmp_path, backend, refusal):
    kube.denies[STORE[backend][0]] = refusal
    result = barlow("submit", "pretrain", spec_file(tmp_path, backend))
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: the API server rejected {backend} demo: admission webhook denied the request: {refusal}"
    assert writes(kube) == [("POST", POLICIES), ("POST", JOBS[backend]), ("DELETE", f"{POLICIES}/demo-peers")]
    assert policies(kube) == {} and stored_jobs(kube, backend) == {}


def test_a_policy_that_cannot_be_deleted_after_a_refusal_is_named_in_the_one_line(kube, tmp_path):
    kube.denies["trainjobs"] = "refused"
    kube.delete_fails.add("networkpolicies")
    result = barlow("submit", "pretrain", spec_file(tmp_path, "trainjob"))
    assert result.exit_code == 1
    assert result.stderr.strip() == ("error: the API server rejected trainjob demo: admission webhook denied the request: "
                                     "refused; and its networkpolicy demo-peers is left behind: the Kubernetes API "
                                     "answered 503 Service Unavailable: the server is currently unable to handle the request")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_crd_is_found_before_anything_is_written(kube, tmp_path, backend):
    setattr(kube, {"pytorchjob": "crd", "trainjob": "trainer"}[backend], False)
    result = barlow("submit", "pretrain", spec_file(tmp_path, backend))
    assert result.exit_code == 1 and "CRD" in result.stderr
    assert writes(kube) == [] and policies(kube) == {}


def test_a_job_whose_policy_went_missing_gets_it_back_owned(kube, tmp_path):
    path = spec_file(tmp_path, "trainjob")
    assert barlow("submit", "pretrain", path).exit_code == 0
    policies(kube).clear()  # deleted by hand, or the job submitted by a barlow without policies
    again = barlow("submit", "pretrain", path)
    assert again.exit_code == 0, again.stderr
    assert again.stdout.splitlines()[:2] == ["networkpolicy demo-peers in namespace barlow: created",
                                             "trainjob demo in namespace barlow: already submitted"]
    uid = stored_jobs(kube, "trainjob")["demo"]["metadata"]["uid"]
    assert [o["uid"] for o in policies(kube)["demo-peers"]["metadata"]["ownerReferences"]] == [uid]


@pytest.mark.parametrize("existing, line", [
    ({"metadata": {"name": "demo-peers", "labels": {}}, "spec": {}},
     "error: networkpolicy demo-peers already exists in namespace 'barlow' and was not created by barlow; rename the run "
     "(spec field name)"),
    ({"metadata": {"name": "demo-peers", "labels": {"app.kubernetes.io/managed-by": "barlow"}},
      "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}},
     "error: networkpolicy demo-peers in namespace 'barlow' admits other pods than this job's: delete it "
     "(kubectl -n barlow delete networkpolicy demo-peers) and submit again"),
])
def test_a_policy_of_that_name_that_is_not_this_jobs_is_an_error_before_any_write(kube, tmp_path, existing, line):
    kube.objects[(GROUP, "barlow", "networkpolicies")] = {"demo-peers": existing}
    result = barlow("submit", "pretrain", spec_file(tmp_path, "trainjob"))
    assert result.exit_code == 1 and result.stderr.strip() == line
    assert writes(kube) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_follow_up_submits_the_eval_with_its_own_policy(kube, tmp_path, backend, monkeypatch):
    assert barlow("submit", "pretrain", spec_file(tmp_path, backend)).exit_code == 0
    if backend == "pytorchjob":
        kube.phases["demo"] = ["Running", "Succeeded"]
    else:
        kube.scripted["demo"] = [{"status": {"conditions": [{"type": "Complete", "status": "True", "message": ""}]}}]
    ev = parse_spec(set_path(SPEC, "cluster.backend", backend)).eval_spec()
    monkeypatch.setenv("BARLOW_SPEC", dump_spec(ev))  # as the follow-up Job passes it
    result = barlow("submit", "eval", "--after", "demo", "--poll", "0.01")
    assert result.exit_code == 0, result.stderr
    name = network_policy_name(ev)
    assert writes(kube)[-3:] == [("POST", POLICIES), ("POST", JOBS[backend]), ("PATCH", f"{POLICIES}/{name}")]
    assert policies(kube)[name]["spec"]["podSelector"]["matchLabels"] == {k: labels(ev)[k] for k in PEER_LABELS}
    owner = policies(kube)[name]["metadata"]["ownerReferences"][0]
    assert owner["uid"] == stored_jobs(kube, backend)[ev.name]["metadata"]["uid"]


VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "DELETE": "delete"}  # on one named object, or a create


@pytest.mark.parametrize("role", ["role.yaml", "role-submitter.yaml"])  # the follow-up's, and a person's
def test_the_roles_grant_exactly_the_verbs_submit_uses_on_network_policies(kube, tmp_path, monkeypatch, role):
    path = spec_file(tmp_path, "trainjob")
    assert barlow("submit", "pretrain", path).exit_code == 0  # the policy created, then owned
    assert barlow("submit", "pretrain", path).exit_code == 0  # read again
    kube.denies["trainjobs"] = "refused"
    monkeypatch.setenv("BARLOW_SPEC", dump_spec(parse_spec(set_path(SPEC, "cluster.backend", "trainjob")).eval_spec()))
    assert barlow("submit", "eval").exit_code == 1  # the refused job's policy deleted again
    used = {VERBS[r.method] for r in kube.calls(prefix=POLICIES)}
    rules = yaml.safe_load((ROOT / "k8s" / "base" / role).read_text())["rules"]
    (granted,) = [r["verbs"] for r in rules if r["resources"] == ["networkpolicies"]]
    assert sorted(granted) == sorted(used) == ["create", "delete", "get", "patch"]
