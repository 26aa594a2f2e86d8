"""Rendering specs as Kubeflow Trainer v2 TrainJobs: golden YAML, the real CRD schema (strict), the CRD's CEL rules
and the torch plugin's rules checked by hand, the pod the runtime and our patch make together, the world torchrun
builds from the plugin's PET_* variables, and no secrets anywhere.

Regenerate the goldens after an intended change with:  BARLOW_UPDATE_GOLDEN=1 pytest tests/launch/test_launch_trainjob.py
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cluster_specs import SECRET, TRAINJOB_SPECS, check_golden, spec, strict_schema, torchrun_world

from barlow.launch.manifest import COMMAND, RENDERED_BY_ENV, S3_KEYS, to_yaml
from barlow.launch.render import render
from barlow.launch.trainjob import CONTAINER, REPLICATED_JOB, build_trainjob
from barlow.spec import DNS_1035, POD_NAMESPACE_ENV, SPEC_ENV, parse_spec

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parents[1] / "golden" / "trainjob"
SCHEMAS = ROOT.parent / "shared" / "schemas"
K8S_VERSION = kubernetes_validate.latest_version()
GOLDENS = {"pretrain-4x8gpu-kueue": ("pretrain-4x8gpu-kueue", "pretrain"), "eval": ("eval", "eval"),
           "pipeline-1node-cpu": ("pretrain-1node-cpu", "pipeline"),
           "pipeline-4x8gpu-eval": ("pretrain-4x8gpu-kueue", "eval")}  # the eval the pipeline submits: one node
IDS = list(TRAINJOB_SPECS)
PET = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")


def tj(key: str):
    return spec(key, TRAINJOB_SPECS)


def schema_file(name: str) -> dict:
    path = SCHEMAS / name
    if not path.exists():
        pytest.skip(f"{path} not found (the shared/schemas folder beside the project): schema check skipped")
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def crd_validator():
    crd = schema_file("trainer.kubeflow.org_trainjobs.yaml")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    return jsonschema.validators.validator_for(schema)(schema)


@pytest.fixture(scope="module")
def runtime():
    return schema_file("torch_distributed_runtime.yaml")


@pytest.mark.parametrize("golden", list(GOLDENS))
def test_render_matches_golden(golden):
    key, what = GOLDENS[golden]
    text = to_yaml(render(tj(key), what))
    path = GOLDEN / f"{golden}.yaml"
    check_golden(path, text)


@pytest.mark.parametrize("key", IDS)
def test_rendered_trainjob_validates_against_the_crd_schema(crd_validator, key):
    job = render(tj(key))[1]
    assert [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator.iter_errors(job)] == []


def test_the_strict_crd_schema_catches_a_typo(crd_validator):
    job = render(tj("eval"))[1]
    job["spec"]["trainer"]["numProcsPerNode"] = 1
    job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
        "template"]["spec"]["priorityClassName"] = "high"  # not patchable in v2.3
    messages = " ".join(e.message for e in crd_validator.iter_errors(job))
    assert "numProcsPerNode" in messages and "priorityClassName" in messages


def cel_and_plugin_problems(job: dict, runtime: dict) -> list[str]:
    """The CRD's CEL rules that jsonschema cannot evaluate (x-kubernetes-validations), and the torch plugin's and the
    runtime's constraints, checked by hand: the ones a rendered TrainJob could break."""
    problems, name, spec_ = [], job["metadata"]["name"], job["spec"]
    if not DNS_1035.match(name) or len(name) > 63:
        problems.append("metadata.name must be a DNS-1035 label of at most 63 characters")
    if spec_.get("managedBy") not in (None, "trainer.kubeflow.org/trainjob-controller", "kueue.x-k8s.io/multikueue"):
        problems.append("spec.managedBy is not a known manager")
    problems += [f"trainer.env sets {e['name']}" for e in spec_["trainer"].get("env", []) if e["name"] in PET]
    if spec_["runtimeRef"]["name"] != runtime["metadata"]["name"]:
        problems.append(f"runtimeRef {spec_['runtimeRef']['name']} is not the runtime checked here")
    managers = [p["manager"] for p in spec_.get("runtimePatches", [])]
    if len(managers) != len(set(managers)):
        problems.append("runtimePatches: manager is the list's map key and must be unique")
    rt_jobs = {j["name"]: j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    for patch in spec_.get("runtimePatches", []):
        for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            if rj["name"] not in rt_jobs:  # a patch for a job the runtime lacks matches nothing
                problems.append(f"patch for replicated job {rj['name']} that the runtime does not have")
                continue
            have = {c["name"] for c in rt_jobs[rj["name"]]["template"]["spec"]["template"]["spec"]["containers"]}
            problems += [f"patch for container {c['name']} that the runtime does not have"
                         for c in rj["template"]["spec"]["template"]["spec"].get("containers", []) if c["name"] not in have]
    return problems


@pytest.mark.parametrize("key", IDS)
def test_rendered_trainjob_keeps_the_cel_and_torch_plugin_rules(key, runtime):
    assert cel_and_plugin_problems(render(tj(key))[1], runtime) == []


@pytest.mark.parametrize("break_it, problem", [
    (lambda j: j["metadata"].update(name="Bad_Name"), "metadata.name must be a DNS-1035 label"),
    (lambda j: j["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "2"}), "trainer.env sets PET_NNODES"),
    (lambda j: j["spec"]["runtimePatches"].append(copy.deepcopy(j["spec"]["runtimePatches"][0])), "manager is the list's"),
    (lambda j: j["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0].update(
        name="trainer"), "replicated job trainer"),
])
def test_the_hand_check_catches_broken_trainjobs(runtime, break_it, problem):
    job = render(tj("pretrain-4x8gpu-kueue"))[1]
    break_it(job)
    assert any(problem in p for p in cel_and_plugin_problems(job, runtime))


def pod_of(job: dict, runtime: dict) -> dict:
    """The node pod template the runtime and our patch make together (a merge by container name, as the controller
    does), with the trainer's image, command, env and resources on the `node` container."""
    base = copy.deepcopy(runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"])
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pt = patch["template"]["spec"]["template"]
    for key, values in pt["metadata"].items():  # labels, annotations
        base.setdefault("metadata", {}).setdefault(key, {}).update(values)
    containers = {c["name"]: c for c in base["spec"]["containers"]}
    for c in pt["spec"]["containers"]:
        containers[c["name"]].update(c)
    base["spec"].update({k: v for k, v in pt["spec"].items() if k != "containers"})
    t = job["spec"]["trainer"]
    containers[CONTAINER].update(image=t["image"], command=t["command"], env=t["env"], resources=t["resourcesPerNode"])
    return base


@pytest.mark.parametrize("key", IDS)
def test_the_node_pod_validates_as_a_kubernetes_pod_template(key, runtime):
    s, job = tj(key), render(tj(key))[1]
    template = pod_of(job, runtime)
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{key}-node"},
                                  "template": template}, K8S_VERSION, strict=True)
    pod, (container,) = template["spec"], template["spec"]["containers"]
    c = s.cluster
    assert container["image"] == c.image and container["command"] == COMMAND
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": c.shm_size}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod.get("nodeSelector", {}) == c.node_selector and pod.get("tolerations", []) == c.tolerations
    assert pod["serviceAccountName"] == c.service_account
    assert pod["terminationGracePeriodSeconds"] == c.termination_grace_seconds
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    want = {"cpu": c.cpu, "memory": c.memory, **({"nvidia.com/gpu": str(c.gpus_per_node)} if c.gpus_per_node else {})}
    assert container["resources"] == {"requests": want, "limits": want}


def _plugin_env(job: dict, index: int) -> dict[str, str]:
    """What the torch plugin (Trainer v2.3, pkg/runtime/framework/plugins/torch) sets on node `index`."""
    t, name = job["spec"]["trainer"], job["metadata"]["name"]
    return {"PET_NNODES": str(t["numNodes"]), "PET_NPROC_PER_NODE": str(t["numProcPerNode"]), "PET_NODE_RANK": str(index),
            "PET_MASTER_ADDR": f"{name}-{REPLICATED_JOB}-0-0.{name}", "PET_MASTER_PORT": "29400"}


@pytest.mark.parametrize("key", IDS)
def test_torchrun_in_the_nodes_builds_the_world_the_spec_asks_for(key, monkeypatch):
    s, job = tj(key), render(tj(key))[1]
    t = job["spec"]["trainer"]
    own = {e["name"]: e["value"] for e in t["env"] if "value" in e}
    world, ranks = None, []
    for index in range(t["numNodes"]):
        w, r = torchrun_world(t["command"][3:], {**own, **_plugin_env(job, index)}, monkeypatch)
        assert world in (None, w)
        world, ranks = w, ranks + r
    assert world == s.runtime.world_size and sorted(ranks) == list(range(world))


@pytest.mark.parametrize("key", IDS)
def test_identity_queue_and_spec_come_from_the_spec(key):
    s, job = tj(key), render(tj(key))[1]
    meta, t = job["metadata"], job["spec"]["trainer"]
    assert (meta["name"], meta["namespace"]) == (s.name, s.cluster.namespace)
    assert meta["labels"]["barlow.dev/spec-hash"] == s.spec_hash()
    assert meta["labels"].get("kueue.x-k8s.io/queue-name") == s.cluster.queue
    assert meta["labels"].get("kueue.x-k8s.io/priority-class") == s.cluster.workload_priority_class
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": s.cluster.training_runtime}
    assert (t["numNodes"], t["numProcPerNode"]) == (s.runtime.nodes, s.runtime.nproc_per_node)
    env = {e["name"]: e.get("value") for e in t["env"]}
    assert parse_spec(yaml.safe_load(env[SPEC_ENV]), SPEC_ENV) == s


@pytest.mark.parametrize("key", IDS)
def test_no_secret_value_appears_and_credentials_come_by_reference(key, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(var, SECRET)
    s = tj(key)
    docs = render(s, "pipeline" if s.kind == "pretrain" else None)
    assert SECRET not in to_yaml(docs)
    env = docs[1]["spec"]["trainer"]["env"]
    assert {e["name"] for e in env if "value" in e} == {SPEC_ENV, RENDERED_BY_ENV, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}
    refs = [e for e in env if "valueFrom" in e]
    want = [{"name": k, "valueFrom": {"secretKeyRef": {"name": s.cluster.s3_secret, "key": k}}} for k in S3_KEYS]
    namespace = {"name": POD_NAMESPACE_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    assert refs == [namespace, *(want if s.cluster.s3_secret else [])]


def test_the_pipeline_follow_up_waits_for_the_trainjob():
    follow = render(tj("pretrain-1node-cpu"), "pipeline")[2]
    kubernetes_validate.validate(follow, K8S_VERSION, strict=True)
    env = follow["spec"]["template"]["spec"]["containers"][0]["env"]
    carried = parse_spec(yaml.safe_load(next(e["value"] for e in env if e["name"] == SPEC_ENV)))
    assert carried.cluster.backend == "trainjob"  # `submit eval --after` reads the pretrain TrainJob


@pytest.mark.parametrize("name", ["a", "x" * 50])
def test_names_fit(name):
    job = build_trainjob(parse_spec({**TRAINJOB_SPECS["eval"], "name": name}))
    assert DNS_1035.match(job["metadata"]["name"]) and len(f"{name}-node-0-1023") <= 63


@pytest.mark.parametrize("key", IDS)
def test_the_trainjob_keeps_trainer_v2_4_rules(key, runtime):
    """Trainer v2.4.0's release notes: "limit ReplicatedJob name length to 20 characters in runtimes" (#4394, a
    breaking change): the runtime barlow patches, and the name it patches, fit. v2.4.0 adds DRA as
    `spec.trainer.resourceClaimsPerNode` behind the controller's alpha `DynamicResourceAllocation` feature gate, and
    rejects `resourcesPerNode.claims` (docs/operator-guides/dynamic-resource-allocation.md): barlow uses neither
    (extended resources go through resourcesPerNode's requests and limits)."""
    job = render(tj(key))[1]
    patched = [rj["name"] for p in job["spec"]["runtimePatches"]
               for rj in p["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]]
    in_runtime = [rj["name"] for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]]
    assert patched == [REPLICATED_JOB] and REPLICATED_JOB in in_runtime
    assert all(len(n) <= 20 for n in patched + in_runtime), patched + in_runtime
    trainer = job["spec"]["trainer"]
    assert "resourceClaimsPerNode" not in trainer and set(trainer["resourcesPerNode"]) == {"requests", "limits"}
