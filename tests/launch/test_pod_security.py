"""Every pod barlow renders meets the Pod Security Standards' "restricted" profile: the training pods of both backends
(a TrainJob's as its runtime and our patch make them together), the pipeline's follow-up and the eval, for every
golden manifest and every example spec. The checker holds every rule of the profile (baseline's included, as the
admission controller applies them, Kubernetes 1.30+), and a table shows each rule can fail."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from barlow.launch.manifest import RUN_AS
from barlow.launch.render import render
from barlow.spec import load_spec, with_fields

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::barlow.launch.checks.ClusterWarning")  # a queued example as a PyTorchJob
GOLDENS = sorted((Path(__file__).parents[1] / "golden").glob("*/*.yaml"))
# The cluster examples (they name an image); a local run is refused on a cluster (tests/launch/test_launch_examples.py).
EXAMPLES = [p for p in sorted((ROOT / "examples").glob("*.yaml")) if load_spec(p).cluster.image]
RUNTIME = ROOT.parent / "shared" / "schemas" / "torch_distributed_runtime.yaml"

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
APPARMOR_TYPES = {"RuntimeDefault", "Localhost"}
SECCOMP_TYPES = {"RuntimeDefault", "Localhost"}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def restricted_violations(template: dict) -> list[str]:
    """The "restricted" rules a pod template breaks (empty: it is admitted under `enforce: restricted`)."""
    pod, meta = template.get("spec") or {}, template.get("metadata") or {}
    psc = pod.get("securityContext") or {}
    containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or []), *(pod.get("ephemeralContainers") or [])]
    out = []
    # baseline
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("pod: windowsOptions.hostProcess")
    out += [f"pod: {k}" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    out += [f"volume {v.get('name')}: hostPath" for v in pod.get("volumes") or [] if "hostPath" in v]
    out += [f"annotation {k}: {v}" for k, v in (meta.get("annotations") or {}).items()
            if k.startswith(APPARMOR_ANNOTATION) and not (v == "runtime/default" or v.startswith("localhost/"))]
    out += [f"pod: sysctl {s.get('name')}" for s in psc.get("sysctls") or [] if s.get("name") not in SAFE_SYSCTLS]
    # restricted: volumes, and the pod-level defaults each container may take
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            out.append(f"volume {v.get('name')}: type {sorted(kinds - ALLOWED_VOLUMES)}")
    for where, sc in [("pod", psc), *((c["name"], c.get("securityContext") or {}) for c in containers)]:
        if (sc.get("appArmorProfile") or {}).get("type", "RuntimeDefault") not in APPARMOR_TYPES:
            out.append(f"{where}: appArmorProfile")
        se = sc.get("seLinuxOptions") or {}
        if se.get("type", "") not in SELINUX_TYPES or se.get("user") or se.get("role"):
            out.append(f"{where}: seLinuxOptions")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}: runAsUser 0")
        if sc.get("runAsNonRoot") is False:
            out.append(f"{where}: runAsNonRoot false")
        if "seccompProfile" in sc and sc["seccompProfile"].get("type") not in SECCOMP_TYPES:
            out.append(f"{where}: seccompProfile {sc['seccompProfile'].get('type')}")
    for c in containers:
        sc, name = c.get("securityContext") or {}, c["name"]
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{name}: windowsOptions.hostProcess")
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        out += [f"{name}: hostPort {p['hostPort']}" for p in c.get("ports") or [] if p.get("hostPort")]
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation not false")
        if psc.get("runAsNonRoot") is not True and sc.get("runAsNonRoot") is not True:
            out.append(f"{name}: runAsNonRoot not true (pod or container)")
        if "seccompProfile" not in psc and "seccompProfile" not in sc:
            out.append(f"{name}: no seccompProfile (pod or container)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities do not drop ALL")
        out += [f"{name}: adds capability {a}" for a in caps.get("add") or [] if a != "NET_BIND_SERVICE"]
    return out


def trainjob_pod(job: dict, runtime: dict) -> dict:
    """The node pod template a TrainJob's runtime and its runtimePatches make together (merged by container name)."""
    base = copy.deepcopy(runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"])
    for patch in job["spec"].get("runtimePatches") or []:
        for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            pt = rj["template"]["spec"]["template"]
            base.setdefault("metadata", {}).setdefault("labels", {}).update(pt.get("metadata", {}).get("labels", {}))
            containers = {c["name"]: c for c in base["spec"]["containers"]}
            for c in pt["spec"].get("containers") or []:
                containers[c["name"]].update(c)
            base["spec"].update({k: v for k, v in pt["spec"].items() if k != "containers"})
    return base


def pod_templates(doc: dict, runtime: dict) -> list[tuple[str, dict]]:
    """(where, pod template) for every pod the object makes."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    if kind == "PyTorchJob":
        return [(f"{name}/{r}", rs["template"]) for r, rs in doc["spec"]["pytorchReplicaSpecs"].items()]
    if kind == "TrainJob":
        return [(f"{name}/node", trainjob_pod(doc, runtime))]
    if kind == "Job":
        return [(name, doc["spec"]["template"])]
    if kind == "NetworkPolicy":
        return []
    raise AssertionError(f"{kind} {name}: a kind this test does not know makes pods")


@pytest.fixture(scope="module")
def runtime() -> dict:
    if not RUNTIME.exists():
        pytest.skip(f"{RUNTIME} not found (the shared/schemas folder beside the project): TrainJob pods not checked")
    return yaml.safe_load(RUNTIME.read_text())


def example_docs(path: Path, backend: str) -> list[dict]:
    spec = load_spec(path)
    changes = {"cluster.backend": backend}
    if backend == "trainjob":
        changes["cluster.priority_class"] = None  # a TrainJob has no pod priority class to set
    spec = with_fields(spec, changes, str(path))
    return [d for what in (["pretrain", "eval", "pipeline"] if spec.kind == "pretrain" else ["eval"]) for d in render(spec, what)]


SOURCES = ([pytest.param(("golden", p), id=f"golden/{p.parent.name}/{p.stem}") for p in GOLDENS]
           + [pytest.param(("example", p, b), id=f"example/{p.stem}/{b}") for p in EXAMPLES for b in ("pytorchjob", "trainjob")])


@pytest.mark.parametrize("source", SOURCES)
def test_every_rendered_pod_meets_the_restricted_profile(source, runtime):
    docs = ([d for d in yaml.safe_load_all(source[1].read_text()) if d] if source[0] == "golden"
            else example_docs(source[1], source[2]))
    pods = [p for d in docs for p in pod_templates(d, runtime)]
    assert pods
    for where, template in pods:
        assert restricted_violations(template) == [], where
        # the ids are the pod's own, whatever user the image declares
        sc = template["spec"]["securityContext"]
        assert (sc["runAsUser"], sc["runAsGroup"]) == (RUN_AS, RUN_AS), where


def test_the_goldens_hold_every_kind_of_pod():
    kinds = {d["kind"] for p in GOLDENS for d in yaml.safe_load_all(p.read_text()) if d}
    # training pods of both backends, and the follow-up (a NetworkPolicy makes no pod)
    assert kinds == {"PyTorchJob", "TrainJob", "Job", "NetworkPolicy"}


COMPLIANT = {
    "metadata": {"annotations": {APPARMOR_ANNOTATION + "c": "runtime/default"}},
    "spec": {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"},
                            "sysctls": [{"name": "net.ipv4.tcp_keepalive_time", "value": "60"}]},
        "containers": [{"name": "c", "ports": [{"containerPort": 80}],
                        "securityContext": {"allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}}],
        "volumes": [{"name": "v", "emptyDir": {}}, {"name": "p", "persistentVolumeClaim": {"claimName": "x"}}],
    },
}


def _walk(t: dict, path: str | tuple[str, ...], create: bool):
    """(the node holding the last key, the last key) of a dotted path (a tuple where a key holds dots)."""
    *parents, last = path.split(".") if isinstance(path, str) else path
    node = t
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else (node.setdefault(p, {}) if create else node[p])
    return node, int(last) if isinstance(node, list) else last


def _set(path: str | tuple[str, ...], value):
    def change(t: dict) -> None:
        node, last = _walk(t, path, create=True)
        node[last] = value
    return change


def _drop(path: str):
    def change(t: dict) -> None:
        node, last = _walk(t, path, create=False)
        del node[last]
    return change


C = "spec.containers.0.securityContext"
BREAKS = {  # one broken rule each -> the violation it must produce
    "hostNetwork": (_set("spec.hostNetwork", True), "pod: hostNetwork"),
    "hostPID": (_set("spec.hostPID", True), "pod: hostPID"),
    "hostIPC": (_set("spec.hostIPC", True), "pod: hostIPC"),
    "hostProcess": (_set("spec.securityContext.windowsOptions", {"hostProcess": True}), "pod: windowsOptions.hostProcess"),
    "privileged": (_set(f"{C}.privileged", True), "c: privileged"),
    "hostPort": (_set("spec.containers.0.ports.0.hostPort", 8080), "c: hostPort 8080"),
    "hostPath": (_set("spec.volumes.0", {"name": "h", "hostPath": {"path": "/"}}), "volume h: hostPath"),
    "volume type": (_set("spec.volumes.0", {"name": "n", "nfs": {"server": "s", "path": "/"}}), "volume n: type ['nfs']"),
    "procMount": (_set(f"{C}.procMount", "Unmasked"), "c: procMount"),
    "sysctl": (_set("spec.securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]), "pod: sysctl kernel.msgmax"),
    "apparmor": (_set(f"{C}.appArmorProfile", {"type": "Unconfined"}), "c: appArmorProfile"),
    "apparmor annotation": (_set(("metadata", "annotations", APPARMOR_ANNOTATION + "c"), "unconfined"),
                            f"annotation {APPARMOR_ANNOTATION}c: unconfined"),
    "selinux": (_set("spec.securityContext.seLinuxOptions", {"type": "spc_t"}), "pod: seLinuxOptions"),
    "escalation": (_drop(f"{C}.allowPrivilegeEscalation"), "c: allowPrivilegeEscalation not false"),
    "non-root": (_drop("spec.securityContext.runAsNonRoot"), "c: runAsNonRoot not true (pod or container)"),
    "non-root off": (_set(f"{C}.runAsNonRoot", False), "c: runAsNonRoot false"),
    "uid 0": (_set(f"{C}.runAsUser", 0), "c: runAsUser 0"),
    "seccomp missing": (_drop("spec.securityContext.seccompProfile"), "c: no seccompProfile (pod or container)"),
    "seccomp unconfined": (_set(f"{C}.seccompProfile", {"type": "Unconfined"}), "c: seccompProfile Unconfined"),
    "drop ALL": (_set(f"{C}.capabilities.drop", ["NET_RAW"]), "c: capabilities do not drop ALL"),
    "add capability": (_set(f"{C}.capabilities.add", ["SYS_ADMIN"]), "c: adds capability SYS_ADMIN"),
    "init container": (_set("spec.initContainers", [{"name": "i", "securityContext": {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "privileged": True}}]), "i: privileged"),
}


def test_the_compliant_reference_passes():
    assert restricted_violations(COMPLIANT) == []


@pytest.mark.parametrize("rule", list(BREAKS))
def test_the_checker_catches_each_broken_rule(rule):
    change, violation = BREAKS[rule]
    template = copy.deepcopy(COMPLIANT)
    change(template)
    assert violation in restricted_violations(template)
