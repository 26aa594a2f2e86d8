"""Rendering specs as PyTorchJobs: golden YAML, the real CRD schema, the operator's admission rules, the world that
torchrun builds from the operator's environment, the spec the pod receives, and no secrets anywhere.

Regenerate the goldens after an intended change with:  BARLOW_UPDATE_GOLDEN=1 pytest tests/launch/test_launch_pytorchjob.py
(then read the diff before committing it).
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cluster_specs import SECRET, SPECS, TRAINJOB_SPECS, check_golden, spec, strict_schema, torchrun_world
from typer.testing import CliRunner

from barlow.cli import app
from barlow.launch.manifest import COMMAND, RENDERED_BY_ENV, job_name, to_yaml
from barlow.launch.pytorchjob import PORT_NAME, build_pytorchjob, to_dict
from barlow.launch.render import render
from barlow.spec import DNS_1035, POD_NAMESPACE_ENV, SPEC_ENV, RunSpec, parse_spec, set_path

# eval-kueue warns that Kueue >= 0.19 leaves PyTorchJobs alone by default (test_a_queue_on_a_pytorchjob_warns_once)
pytestmark = pytest.mark.filterwarnings("ignore::barlow.launch.checks.ClusterWarning")
ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parents[1] / "golden" / "pytorchjob"
CRD = ROOT.parent / "shared" / "schemas" / "kubeflow.org_pytorchjobs.yaml"
K8S_VERSION = kubernetes_validate.latest_version()

GOLDENS = {  # golden file -> (spec, what barlow render is asked for)
    "pretrain-1node-cpu": ("pretrain-1node-cpu", "pretrain"),
    "pretrain-4x8gpu": ("pretrain-4x8gpu", "pretrain"),
    "eval": ("eval", "eval"),
    "pipeline-1node-cpu": ("pretrain-1node-cpu", "pipeline"),
    "pretrain-2x8gpu-gang": ("pretrain-2x8gpu-gang", "pretrain"),
    "eval-kueue": ("eval-kueue", "eval"),
    "pipeline-4x8gpu-eval": ("pretrain-4x8gpu", "eval"),  # the eval the pipeline submits: one node by default
}


# Every job rendered from SPECS, the pipelines' derived evals included; rendered inside the tests (a rendering bug
# fails those tests, not the collection of this file).
IDS = [k for key in SPECS for k in ([key, f"{key}/eval"] if SPECS[key]["kind"] == "pretrain" else [key])]


def rendered(id_: str) -> tuple[RunSpec, dict]:
    """(spec, PyTorchJob) for one of IDS."""
    key, _, derived = id_.partition("/")
    s = spec(key)
    return (s.eval_spec(), render(s, "eval")[1]) if derived else (s, render(s)[1])


@pytest.mark.parametrize("golden", list(GOLDENS))
def test_render_matches_golden(golden):
    key, what = GOLDENS[golden]
    text = to_yaml(render(spec(key), what))
    path = GOLDEN / f"{golden}.yaml"
    check_golden(path, text)


def test_cli_render_prints_the_golden(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPECS["pretrain-4x8gpu"]))
    result = CliRunner().invoke(app, ["render", "pretrain", str(path)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == (GOLDEN / "pretrain-4x8gpu.yaml").read_text()
    derived = CliRunner().invoke(app, ["render", "eval", str(path)])  # a pretrain spec's eval: its follow-up
    assert derived.exit_code == 0
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(derived.stdout)] == ["imagenet-r50-eval-peers",
                                                                                   "imagenet-r50-eval"]


@pytest.fixture(scope="module")
def crd_validator():
    if not CRD.exists():
        pytest.skip(f"CRD schema not found at {CRD} (the shared/schemas folder beside the project): schema check skipped")
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    return jsonschema.validators.validator_for(schema)(schema)


@pytest.mark.parametrize("key", IDS)
def test_rendered_job_validates_against_the_crd_schema(crd_validator, key):
    s, job = rendered(key)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator.iter_errors(job)]
    assert errors == []


def test_the_strict_crd_schema_catches_a_typo(crd_validator):
    job = copy.deepcopy(rendered(IDS[0])[1])
    job["spec"]["nprocPerNod"] = "2"
    job["spec"]["runPolicy"]["backoffLimit"] = "3"
    messages = sorted(e.message for e in crd_validator.iter_errors(job))
    assert any("nprocPerNod" in m for m in messages) and any("'3' is not of type 'integer'" in m for m in messages)


def admission_problems(job: dict) -> list[str]:
    """The training operator's (v1.9) validating-webhook rules for a PyTorchJob."""
    problems, name = [], job["metadata"]["name"]
    if not DNS_1035.match(name) or len(name) > 63:
        problems.append(f"metadata.name {name!r} is not a DNS-1035 label")
    specs = job["spec"]["pytorchReplicaSpecs"]
    problems += [f"replica type {t} is not Master or Worker" for t in specs if t not in ("Master", "Worker")]
    if "Master" in specs and specs["Master"].get("replicas", 1) != 1:
        problems.append("Master must have exactly 1 replica")
    if "Worker" in specs and specs["Worker"].get("replicas", 1) < 1:
        problems.append("Worker must have at least 1 replica")
    for rtype, rs in specs.items():
        containers = rs["template"]["spec"].get("containers") or []
        if not any(c["name"] == "pytorch" for c in containers):
            problems.append(f"{rtype}: no container named pytorch")
        problems += [f"{rtype}: container {c['name']} has no image" for c in containers if not c.get("image")]
    nproc = job["spec"].get("nprocPerNode", "auto")
    if not str(nproc).isdigit():
        problems.append(f"nprocPerNode {nproc!r} is not a number of processes")
    return problems


@pytest.mark.parametrize("key", IDS)
def test_rendered_job_passes_the_operators_admission_rules(key):
    s, job = rendered(key)
    assert admission_problems(job) == []
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    assert specs.get("Worker", {}).get("replicas", 0) == s.runtime.nodes - 1
    assert ("Worker" in specs) == (s.runtime.nodes > 1)
    assert {rs["restartPolicy"] for rs in specs.values()} == {"ExitCode"}


@pytest.mark.parametrize("break_it, problem", [
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2), "Master must have exactly 1 replica"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas=0), "Worker must have at least 1 replica"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].update(name="main"),
     "Master: no container named pytorch"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0].update(image=""),
     "Worker: container pytorch has no image"),
    (lambda j: j["spec"].update(nprocPerNode="auto"), "nprocPerNode 'auto' is not a number of processes"),
])
def test_admission_check_catches_broken_jobs(break_it, problem):
    job = copy.deepcopy(render(spec("pretrain-4x8gpu"))[1])
    break_it(job)
    assert problem in admission_problems(job)


@pytest.mark.parametrize("key", IDS)
def test_pod_templates_validate_as_kubernetes_pod_templates(key):
    s, job = rendered(key)
    for rtype, rs in job["spec"]["pytorchReplicaSpecs"].items():
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{key.replace('/', '-')}-{rtype.lower()}"},
                    "template": rs["template"]}
        kubernetes_validate.validate(template, K8S_VERSION, strict=True)


def test_follow_up_job_validates_as_a_kubernetes_job():
    follow = render(spec("pretrain-4x8gpu"), "pipeline")[2]
    kubernetes_validate.validate(follow, K8S_VERSION, strict=True)
    container = follow["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["barlow", "submit", "eval", "--after", "imagenet-r50", "--poll", "30"]
    carried = parse_spec(yaml.safe_load(next(e["value"] for e in container["env"] if e["name"] == SPEC_ENV)))
    assert carried == spec("pretrain-4x8gpu").eval_spec()


def _operator_env(job: dict, rtype: str, index: int) -> dict[str, str]:
    """The variables the training operator (v1.9, pkg/controller.v1/pytorch/envvar.go and master.go) adds to a pod."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    total = sum(rs["replicas"] for rs in specs.values())
    master = specs["Master"]["template"]["spec"]["containers"][0]
    port = next(p["containerPort"] for p in master["ports"] if p["name"] == PORT_NAME)
    node_rank = index + 1 if rtype == "Worker" else index
    addr = f"{job['metadata']['name']}-master-0"
    return {"PYTHONUNBUFFERED": "1", "MASTER_PORT": str(port), "MASTER_ADDR": addr, "PET_MASTER_PORT": str(port),
            "PET_MASTER_ADDR": addr, "WORLD_SIZE": str(total * int(job["spec"]["nprocPerNode"])), "RANK": str(node_rank),
            "PET_NNODES": str(total), "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"], "PET_NODE_RANK": str(node_rank)}


@pytest.mark.parametrize("key", IDS)
def test_torchrun_in_the_pods_builds_the_world_the_spec_asks_for(key, monkeypatch):
    s, job = rendered(key)
    world, ranks = None, []
    for rtype, rs in job["spec"]["pytorchReplicaSpecs"].items():
        container = rs["template"]["spec"]["containers"][0]
        assert container["command"][:3] == ["python", "-m", "barlow.torchrun"]
        own = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        assert not [k for k in own if k.startswith("PET_")], "the operator owns PET_*; the pod must not override them"
        for index in range(rs["replicas"]):
            w, r = torchrun_world(container["command"][3:], {**own, **_operator_env(job, rtype, index)}, monkeypatch)
            assert world in (None, w)
            world, ranks = w, ranks + r
    assert world == s.runtime.world_size
    assert sorted(ranks) == list(range(s.runtime.world_size))
    if s.runtime.nodes == 1:  # the same processes `barlow run` starts on this machine
        from barlow.launch.local import torchrun_command

        local_cmd = torchrun_command(s.runtime.nproc_per_node)
        assert local_cmd[1:3] == ["-m", "barlow.torchrun"]
        assert torchrun_world(local_cmd[3:], {}, monkeypatch) == (world, sorted(ranks))


def test_pod_command_modules_exist():
    assert COMMAND[:3] == ["python", "-m", "barlow.torchrun"] and COMMAND[-2:] == ["-m", "barlow.entrypoint"]
    assert importlib.util.find_spec("barlow.torchrun") and importlib.util.find_spec("barlow.entrypoint")


@pytest.mark.parametrize("key", IDS)
def test_the_pod_receives_the_resolved_spec_and_it_validates(key):
    s, job = rendered(key)
    for rs in job["spec"]["pytorchReplicaSpecs"].values():
        env = {e["name"]: e["value"] for e in rs["template"]["spec"]["containers"][0]["env"] if "value" in e}
        assert parse_spec(yaml.safe_load(env[SPEC_ENV]), SPEC_ENV) == s


@pytest.mark.parametrize("key", IDS)
def test_job_resources_policy_and_identity_come_from_the_spec(key):
    s, job = rendered(key)
    c = s.cluster
    assert job["metadata"]["name"] == job_name(s) == s.name and job["metadata"]["namespace"] == c.namespace
    assert job["metadata"]["labels"]["barlow.dev/spec-hash"] == s.spec_hash()
    assert job["spec"]["nprocPerNode"] == str(s.runtime.nproc_per_node)
    assert job["spec"]["runPolicy"] == {k: v for k, v in {
        "backoffLimit": 3 if c.backoff_limit is None else c.backoff_limit, "ttlSecondsAfterFinished": c.ttl_seconds_after_finished,
        "activeDeadlineSeconds": c.active_deadline_seconds, "cleanPodPolicy": c.clean_pod_policy or "None",
        "schedulingPolicy": {"minAvailable": s.runtime.nodes, "priorityClass": c.priority_class} if c.gang != "none"
        else None}.items() if v is not None}
    assert job["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == c.queue
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    want = {"cpu": c.cpu, "memory": c.memory, **({"nvidia.com/gpu": str(c.gpus_per_node)} if c.gpus_per_node else {})}
    assert container["resources"] == {"requests": want, "limits": want}
    assert (container["image"], container["imagePullPolicy"]) == (c.image, c.image_pull_policy or "IfNotPresent")
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": c.shm_size}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod.get("nodeSelector", {}) == c.node_selector and pod.get("tolerations", []) == c.tolerations
    assert pod.get("priorityClassName") == c.priority_class and pod["serviceAccountName"] == c.service_account
    assert pod["terminationGracePeriodSeconds"] == c.termination_grace_seconds
    assert pod.get("schedulerName") == {"none": None, "volcano": "volcano"}[c.gang]


@pytest.mark.parametrize("name", ["a", "run-1", "x" * 50])
def test_job_names_leave_room_for_pod_names(name):
    s = parse_spec({**SPECS["pretrain-4x8gpu"], "name": name, "optim": {"batch_size": 8192, "epochs": 10, "warmup_epochs": 1},
                    "runtime": {"nodes": 1024, "nproc_per_node": 8, "device": "cuda"}})
    job = to_dict(build_pytorchjob(s))
    assert DNS_1035.match(job["metadata"]["name"])
    assert len(f"{job['metadata']['name']}-worker-{s.runtime.nodes - 2}") <= 63


@pytest.mark.parametrize("key", list(SPECS))
def test_no_secret_value_appears_in_any_rendered_output(key, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(var, SECRET)
    s = spec(key)
    docs = render(s, "pipeline" if s.kind == "pretrain" else None)
    assert SECRET not in to_yaml(docs)
    for doc in (d for d in docs if d["kind"] != "NetworkPolicy"):  # a policy holds no pod
        templates = ([rs["template"] for rs in doc["spec"]["pytorchReplicaSpecs"].values()] if doc["kind"] == "PyTorchJob"
                     else [doc["spec"]["template"]])
        for t in templates:
            for container in t["spec"]["containers"]:
                assert {e["name"] for e in container["env"]} <= {SPEC_ENV, RENDERED_BY_ENV, POD_NAMESPACE_ENV,
                                                                  "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}
                if doc["kind"] == "PyTorchJob":  # credentials only by reference to the named Secret
                    want = [{"secretRef": {"name": s.cluster.s3_secret}}] if s.cluster.s3_secret else None
                    assert container.get("envFrom") == want


def test_rendering_and_planning_do_not_import_torch(tmp_path):
    path, trainjob = tmp_path / "spec.yaml", tmp_path / "trainjob.yaml"
    path.write_text(yaml.safe_dump(SPECS["pretrain-4x8gpu"]))
    trainjob.write_text(yaml.safe_dump(TRAINJOB_SPECS["pretrain-4x8gpu-kueue"]))
    calls = [["render", "pipeline", str(path)], ["render", "pipeline", str(trainjob)], ["plan", str(path), "--images", "1000"]]
    code = ("import sys; from typer.testing import CliRunner; from barlow.cli import app\n"
            f"for args in {calls!r}:\n"
            "    r = CliRunner().invoke(app, args); assert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("args, message", [
    (["render", "pretrain", "EVAL"], "kind is 'eval'; `pretrain` needs a pretrain spec"),
    (["render", "pipeline", "EVAL"], "kind is 'eval'; `pipeline` needs a pretrain spec"),
])
def test_render_refuses_a_mismatched_kind(tmp_path, args, message):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(SPECS["eval"]))
    result = CliRunner().invoke(app, [str(path) if a == "EVAL" else a for a in args])
    assert result.exit_code == 2 and message in result.stderr


def test_a_pipeline_whose_eval_cannot_run_is_refused_before_rendering(tmp_path):
    path = tmp_path / "spec.yaml"
    no_val = {**SPECS["pretrain-1node-cpu"], "data": {"train": "s3://datasets/digits/train"}}
    path.write_text(yaml.safe_dump(no_val))
    result = CliRunner().invoke(app, ["render", "pipeline", str(path)])
    assert result.exit_code == 2
    assert "error: the follow-up eval: data.val: an eval needs validation images" in result.stderr


@pytest.mark.parametrize("backend, warned", [("pytorchjob", True), ("trainjob", False)])
def test_a_queue_on_a_pytorchjob_warns_once(tmp_path, backend, warned):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(set_path(set_path(SPECS["pretrain-1node-cpu"], "cluster.queue", "gpu-team"),
                                            "cluster.backend", backend)))
    result = CliRunner().invoke(app, ["render", "pipeline", str(path)])
    assert result.exit_code == 0, result.stderr
    assert [d["kind"] for d in yaml.safe_load_all(result.stdout)] == ["NetworkPolicy", {
        "pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}[backend], "Job"]
    want = ["warning: cluster.queue: Kueue >= 0.19 disables its PyTorchJob (kubeflow.org/v1) integration by default: "
            "the job runs unqueued unless the cluster's Kueue enables it; backend trainjob is integrated by default"]
    assert result.stderr.splitlines() == (want if warned else [])
