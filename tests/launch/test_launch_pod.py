"""Pod customisation on both backends: cluster.env, image_pull_secrets, volumes, annotations, pod_labels,
extra_resources, affinity and the pod_patch escape hatch reach the training pod the same way under a PyTorchJob and a
TrainJob; the 4 x 8 InfiniBand example renders (golden) and passes the strict CRD and Pod schemas on both; a patch that
does not fit the Pod schema, or that a TrainJob cannot carry, is refused before anything is rendered.

Regenerate the goldens after an intended change with:  BARLOW_UPDATE_GOLDEN=1 pytest tests/launch/test_launch_pod.py
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cluster_specs import SPECS, check_golden, strict_schema
from test_launch_trainjob import pod_of, schema_file
from typer.testing import CliRunner

from barlow.cli import app
from barlow.launch.manifest import MERGE_KEYS, RenderError, strategic_merge, to_yaml
from barlow.launch.render import render
from barlow.launch.trainjob import PATCHABLE
from barlow.spec import load_spec, parse_spec, set_path, with_fields

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "imagenet-4x8-infiniband.yaml"
K8S_VERSION = kubernetes_validate.latest_version()
CRDS = {"PyTorchJob": ("kubeflow.org_pytorchjobs.yaml", "v1"), "TrainJob": ("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1")}
pytestmark = pytest.mark.filterwarnings("ignore::barlow.launch.checks.ClusterWarning")  # the example's queue as a PyTorchJob


@pytest.fixture(scope="module")
def runtime():
    return schema_file("torch_distributed_runtime.yaml")


def crd_errors(job: dict) -> list[str]:
    name, version = CRDS[job["kind"]]
    (v,) = [v for v in schema_file(name)["spec"]["versions"] if v["name"] == version]
    schema = strict_schema(v["schema"]["openAPIV3Schema"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft202012Validator(schema).iter_errors(job)]


def training_pod(job: dict, runtime: dict) -> dict:
    """The training pod template of either backend's job: a PyTorchJob's Master, or the TrainJob's node pod as the
    runtime, our patch and the trainer make it."""
    if job["kind"] == "PyTorchJob":
        return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    return pod_of(job, runtime)


def container_of(pod: dict) -> dict:
    (container,) = pod["spec"]["containers"]
    return container


def as_backend(spec, backend: str):
    return with_fields(spec, {"cluster.backend": backend})


BACKENDS = ["trainjob", "pytorchjob"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_infiniband_example_matches_its_golden(backend):
    text = to_yaml(render(as_backend(load_spec(EXAMPLE), backend), "pretrain"))
    check_golden(ROOT / "tests" / "golden" / backend / "infiniband-4x8.yaml", text)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["pipeline", "eval"])
def test_the_infiniband_examples_pipeline_and_eval_match_their_goldens(backend, what):
    """The follow-up Job pulls with the pull secrets; the one-node eval keeps its RDMA device, not the Multus network."""
    text = to_yaml(render(as_backend(load_spec(EXAMPLE), backend), what))
    check_golden(ROOT / "tests" / "golden" / backend / f"infiniband-4x8-{what}.yaml", text)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_pipelines_follow_up_pulls_with_the_image_pull_secrets(backend):
    follow_up = render(as_backend(load_spec(EXAMPLE), backend), "pipeline")[2]
    assert follow_up["kind"] == "Job"
    assert follow_up["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "registry-credentials"}]
    kubernetes_validate.validate(follow_up, K8S_VERSION, strict=True)


# (pretrain cluster fields, eval.cluster fields, the eval pod's extended resources and annotations)
NETWORK = {"k8s.v1.cni.cncf.io/networks": "ib-sriov-network", "team": "vision"}
EVAL_PLACEMENTS = [
    ({"extra_resources": {"nvidia.com/hostdev": 8}}, {"gpus_per_node": 1}, {"nvidia.com/hostdev": "1"}, {}),
    ({"extra_resources": {"nvidia.com/hostdev": 8, "rdma/shared": 1}}, {"gpus_per_node": 2},
     {"nvidia.com/hostdev": "2", "rdma/shared": "1"}, {}),  # scaled, rounded up
    ({"extra_resources": {"nvidia.com/hostdev": 8}}, {}, {"nvidia.com/hostdev": "8"}, {}),  # 8 GPUs: unchanged
    ({"extra_resources": {"nvidia.com/hostdev": 8}}, {"gpus_per_node": 1, "extra_resources": {"nvidia.com/hostdev": 4}},
     {"nvidia.com/hostdev": "4"}, {}),
    ({"annotations": NETWORK}, {}, {}, {"team": "vision"}),  # one node: no fabric between nodes
    ({"annotations": NETWORK}, {"annotations": {}}, {}, {}),
    ({"annotations": NETWORK}, {"annotations": {"k8s.v1.cni.cncf.io/networks": "ib0"}}, {}, {"k8s.v1.cni.cncf.io/networks": "ib0"}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pretrain, eval_cluster, resources, annotations", EVAL_PLACEMENTS)
def test_the_eval_pods_extended_resources_and_annotations(backend, pretrain, eval_cluster, resources, annotations,
                                                          runtime):
    data = set_path(copy.deepcopy(BASE), "eval.cluster", eval_cluster)
    data["cluster"].update(backend=backend, **pretrain)
    pod = training_pod(render(parse_spec(data), "eval")[1], runtime)
    limits = container_of(pod)["resources"]["limits"]
    assert {k: v for k, v in limits.items() if k not in ("cpu", "memory", "nvidia.com/gpu")} == resources
    assert {k: v for k, v in (pod["metadata"].get("annotations") or {}).items()
            if k != "kubectl.kubernetes.io/default-container"} == annotations


def test_a_two_node_eval_keeps_the_multus_network():
    data = set_path(set_path(copy.deepcopy(BASE), "eval.runtime.nodes", 2), "cluster.annotations", NETWORK)
    assert parse_spec(data).eval_spec().cluster.annotations == NETWORK


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_infiniband_example_passes_the_strict_crd_and_pod_schemas(backend, runtime):
    spec = as_backend(load_spec(EXAMPLE), backend)
    for what in ("pretrain", "eval", "pipeline"):
        job = render(spec, what)[1]
        assert crd_errors(job) == [], what
        pod = training_pod(job, runtime)
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "ib"}, "template": pod},
                                     K8S_VERSION, strict=True)
    pod = training_pod(render(spec)[1], runtime)
    container, c = container_of(pod), spec.cluster
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {k: env[k] for k in c.env} == {k: str(v) for k, v in c.env.items()}
    assert container["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "ib-sriov-network"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert {"name": "imagenet", "persistentVolumeClaim": {"claimName": "imagenet-shards", "readOnly": True}} in pod["spec"]["volumes"]
    assert {"name": "imagenet", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]
    assert pod["spec"]["affinity"] == c.affinity


BASE = set_path(SPECS["pretrain-4x8gpu"], "cluster.priority_class", None)
for _field in ("image_pull_policy", "backoff_limit", "clean_pod_policy"):
    BASE = set_path(BASE, f"cluster.{_field}", None)


def with_cluster(backend: str, **fields) -> object:
    data = copy.deepcopy(BASE)
    data["cluster"].update(backend=backend, **fields)
    return parse_spec(data)


# (cluster fields, what the training pod must then hold): each typed field, on both backends
FIELDS = [
    ({"env": {"NCCL_DEBUG": "INFO", "HF_TOKEN": {"secret": "hf", "key": "token"}, "MODE": {"config_map": "cfg", "key": "m"}}},
     lambda pod: [e for e in container_of(pod)["env"] if e["name"] in ("NCCL_DEBUG", "HF_TOKEN", "MODE")] == [
         {"name": "NCCL_DEBUG", "value": "INFO"},
         {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
         {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "m"}}}]),
    ({"image_pull_secrets": ["a", "b"]}, lambda pod: pod["spec"]["imagePullSecrets"] == [{"name": "a"}, {"name": "b"}]),
    ({"volumes": [{"name": "cache", "empty_dir": {"size_limit": "100Gi"}, "mount_path": "/cache"},
                  {"name": "home", "nfs": {"server": "nfs.example.com", "path": "/export/home"}, "mount_path": "/home/u",
                   "read_only": True},
                  {"name": "cfg", "config_map": "nccl-topology", "mount_path": "/etc/nccl"}]},
     lambda pod: [v for v in pod["spec"]["volumes"] if v["name"] != "dshm"] == [
         {"name": "cache", "emptyDir": {"sizeLimit": "100Gi"}},
         {"name": "home", "nfs": {"server": "nfs.example.com", "path": "/export/home", "readOnly": True}},
         {"name": "cfg", "configMap": {"name": "nccl-topology"}}]
     and [m for m in container_of(pod)["volumeMounts"] if m["name"] != "dshm"] == [
         {"name": "cache", "mountPath": "/cache"}, {"name": "home", "mountPath": "/home/u", "readOnly": True},
         {"name": "cfg", "mountPath": "/etc/nccl"}]),
    ({"annotations": {"k8s.v1.cni.cncf.io/networks": "ib0,ib1"}},
     lambda pod: pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "ib0,ib1"),
    ({"pod_labels": {"team": "vision"}},
     lambda pod: pod["metadata"]["labels"]["team"] == "vision" and pod["metadata"]["labels"]["barlow.dev/run"] == "imagenet-r50"),
    ({"extra_resources": {"nvidia.com/hostdev": 8}},
     lambda pod: container_of(pod)["resources"]["requests"]["nvidia.com/hostdev"] == "8"
     == container_of(pod)["resources"]["limits"]["nvidia.com/hostdev"]),
    ({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"barlow.dev/run": "imagenet-r50"}}, "topologyKey": "kubernetes.io/hostname"}]}}},
     lambda pod: pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0][
         "topologyKey"] == "kubernetes.io/hostname"),
    # the escape hatch: a sidecar-free init step, an extra env var on the training container, a label removed
    ({"pod_patch": {"metadata": {"labels": {"extra": "yes"}},
                    "spec": {"initContainers": [{"name": "warm", "image": "busybox:1.37", "command": ["true"]}],
                             "containers": [{"name": "CONTAINER", "env": [{"name": "PATCHED", "value": "1"}]}]}}},
     lambda pod: pod["metadata"]["labels"]["extra"] == "yes"
     and [c["name"] for c in pod["spec"]["initContainers"]] == ["warm"]
     and {"name": "PATCHED", "value": "1"} in container_of(pod)["env"]),
]


def _named(fields: dict, backend: str) -> dict:
    """The patch names the training container by its backend's name."""
    name = {"pytorchjob": "pytorch", "trainjob": "node"}[backend]
    return json.loads(json.dumps(fields).replace('"CONTAINER"', json.dumps(name)))


# An init container needs an image, which a TrainJob's runtimePatches cannot carry: that patch is checked on the
# PyTorchJob here and refused on the TrainJob in test_the_init_container_patch_reaches_the_pytorchjob_only.
CASES = [pytest.param(backend, fields, holds, id=f"{backend}-{next(iter(fields))}{i}")
         for backend in BACKENDS for i, (fields, holds) in enumerate(FIELDS)
         if not (backend == "trainjob" and "initContainers" in json.dumps(fields))]


@pytest.mark.parametrize("backend, fields, holds", CASES)
def test_each_field_reaches_the_training_pod_on_both_backends(backend, fields, holds, runtime):
    job = render(with_cluster(backend, **_named(fields, backend)))[1]
    assert crd_errors(job) == []
    pod = training_pod(job, runtime)
    assert holds(pod), pod
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": pod},
                                 K8S_VERSION, strict=True)


@pytest.mark.parametrize("backend, patch, line", [
    ("pytorchjob", {"spec": {"containers": [{"name": "pytorch", "resourcez": {}}]}},
     "cluster.pod_patch.spec.containers[0].resourcez: unknown field"),
    ("trainjob", {"spec": {"hostNetwork": "yes"}}, "cluster.pod_patch.spec.hostNetwork: must be a bool"),
    ("pytorchjob", {"spec": {"nodeselector": {"a": "b"}}},
     "cluster.pod_patch.spec.nodeselector: unknown field (did you mean 'nodeSelector'?)"),
    ("trainjob", {"spec": {"hostIPC": True}}, "cluster.pod_patch: spec.hostIPC cannot be set through a TrainJob's "
                                               "runtimePatches (Trainer v2.3)"),
    ("trainjob", {"spec": {"containers": [{"name": "node", "resources": {"limits": {"rdma/x": "1"}}}]}},
     "cluster.pod_patch: spec.containers[node].resources cannot be set through a TrainJob's runtimePatches"),
    ("trainjob", {"spec": {"initContainers": [{"name": "warm", "image": "busybox:1.37"}]}},
     "cluster.pod_patch: spec.initContainers[warm].image cannot be set through a TrainJob's runtimePatches"),
    ("pytorchjob", {"spec": {"affinity": {"nodeAffinity": {"required": []}}}},
     "cluster.pod_patch.spec.affinity.nodeAffinity.required: unknown field"),
    ("trainjob", {"spec": {"containers": [{"name": "node", "env": [{"name": "HF_TOKEN", "value": "hf_x"}]}]}},
     "cluster.pod_patch: containers[node].env HF_TOKEN looks like a credential: take it from a Secret"),
])
def test_a_patch_that_does_not_fit_is_refused_before_rendering(backend, patch, line):
    with pytest.raises(RenderError) as err:
        render(with_cluster(backend, pod_patch=patch))
    assert str(err.value).startswith(line), str(err.value)


def test_a_bad_affinity_is_refused_by_the_cli_with_exit_2_and_no_manifest(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(set_path(BASE, "cluster.affinity", {"nodeAffinity": {"preferred": []}})))
    result = CliRunner().invoke(app, ["render", "pretrain", str(path)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == "error: cluster.affinity.nodeAffinity.preferred: unknown field"


@pytest.mark.parametrize("base, patch, merged", [
    ({"a": 1, "b": {"c": 2}}, {"b": {"d": 3}, "a": None}, {"b": {"c": 2, "d": 3}}),
    ({"containers": [{"name": "x", "env": [{"name": "A", "value": "1"}]}]},
     {"containers": [{"name": "x", "env": [{"name": "A", "value": "2"}, {"name": "B", "value": "3"}]}, {"name": "y"}]},
     {"containers": [{"name": "x", "env": [{"name": "A", "value": "2"}, {"name": "B", "value": "3"}]}, {"name": "y"}]}),
    ({"volumes": [{"name": "a"}, {"name": "b"}]}, {"volumes": [{"name": "a", "$patch": "delete"}]}, {"volumes": [{"name": "b"}]}),
    ({"tolerations": [{"key": "a"}]}, {"tolerations": [{"key": "b"}]}, {"tolerations": [{"key": "b"}]}),  # atomic list
    ({"nodeSelector": {"a": "1"}}, {"nodeSelector": {"$patch": "replace", "b": "2"}}, {"nodeSelector": {"b": "2"}}),
    ({"securityContext": {"runAsNonRoot": True}}, {"securityContext": {"$patch": "delete"}}, {}),
])
def test_strategic_merge_follows_kubernetes(base, patch, merged):
    assert strategic_merge(base, patch) == merged


def _merge_keys(node, defs, seen=frozenset()) -> dict[str, str]:
    """field name -> x-kubernetes-patch-merge-key of every merge-strategy list under a schema node."""
    out = {}
    if isinstance(node, dict):
        ref = node.get("$ref")
        if ref and ref not in seen:
            return _merge_keys(defs[ref.rsplit("/", 1)[1]], defs, seen | {ref})
        for name, prop in (node.get("properties") or {}).items():
            if "merge" in (prop.get("x-kubernetes-patch-strategy") or "") and "x-kubernetes-patch-merge-key" in prop:
                out[name] = prop["x-kubernetes-patch-merge-key"]
            out.update(_merge_keys(prop, defs, seen))
        if "items" in node:
            out.update(_merge_keys(node["items"], defs, seen))
    return out


def test_the_merge_keys_are_the_pod_schemas():
    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
    defs = json.loads((folder / "_definitions.json").read_text())["$defs"]
    keys = _merge_keys(json.loads((folder / "podtemplatespec-v1.json").read_text()), defs)
    assert {k: v for k, v in keys.items() if k in MERGE_KEYS} == MERGE_KEYS
    # every merge list of a pod template is known, except the object metadata barlow never patches
    assert set(keys) - set(MERGE_KEYS) <= {"ownerReferences"}, set(keys) - set(MERGE_KEYS)


def test_what_a_trainjob_can_patch_is_the_crds():
    crd = schema_file("trainer.kubeflow.org_trainjobs.yaml")
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    patch = v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["runtimePatches"]["items"]["properties"]
    pod = (patch["trainingRuntimeSpec"]["properties"]["template"]["properties"]["spec"]["properties"]["replicatedJobs"]
           ["items"]["properties"]["template"]["properties"]["spec"]["properties"]["template"]["properties"])
    assert set(pod["metadata"]["properties"]) == PATCHABLE["metadata"]
    assert set(pod["spec"]["properties"]) == PATCHABLE["spec"]
    for kind in ("containers", "initContainers"):
        assert set(pod["spec"]["properties"][kind]["items"]["properties"]) == PATCHABLE["containers"]


def test_the_init_container_patch_reaches_the_pytorchjob_only():
    fields = _named(FIELDS[-1][0], "trainjob")
    with pytest.raises(RenderError, match=r"spec.initContainers\[warm\].image, spec.initContainers\[warm\].command"):
        render(with_cluster("trainjob", **fields))
    fields["pod_patch"]["spec"].pop("initContainers")
    job = render(with_cluster("trainjob", **fields))[1]
    assert crd_errors(job) == []


@pytest.mark.parametrize("field, value, line", [
    ("cluster.affinity", {"nodeAffinity": {"preferred": []}}, "error: cluster.affinity.nodeAffinity.preferred: unknown field"),
    ("cluster.pod_patch", {"spec": {"nodeselector": {"a": "b"}}},
     "error: cluster.pod_patch.spec.nodeselector: unknown field (did you mean 'nodeSelector'?)"),
    ("cluster.pod_patch", {"spec": {"terminationGracePeriodSeconds": "long"}},
     "error: cluster.pod_patch.spec.terminationGracePeriodSeconds: must be a int"),
])
def test_validate_holds_affinity_and_pod_patch_to_the_pod_schema_as_render_does(tmp_path, field, value, line):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(set_path(BASE, field, value)))
    for command in ("validate", "render"):
        args = [command, str(path)] if command == "validate" else [command, "pretrain", str(path)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and result.stdout == "", (command, result.stdout)
        assert result.stderr.strip() == line, (command, result.stderr)
