"""A stand-in for the slice of the Kubernetes REST API that barlow's cluster commands use.

A real HTTP server on 127.0.0.1 (http.server in a thread) that stores namespaced objects under /apis
(PyTorchJobs, TrainJobs, batch Jobs, NetworkPolicies, Kueue Workloads; create, get, list, JSON merge patch, delete),
lists pods (with the statuses kubelet and the scheduler
write: see the pod status builders at the end), their events and their logs under /api/v1, and answers errors the way
kube-apiserver does: a Status body with reason and details (404 for an unknown object, a missing namespace or
an API group that is not installed; 403 when forbidden; 409 when the name is taken). Every request is recorded.
The kubernetes client reaches it through a kubeconfig written by `kubeconfig()`.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

TOKEN = "fake-kube-token"  # a test-only bearer token the client sends from the kubeconfig
USER = "alice"
NAMESPACED = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
                        r"(?:/(?P<name>[^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/log$")
EVENTS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/events$")
KUEUE = re.compile(r"^/apis/kueue\.x-k8s\.io/(?P<version>[^/]+)(?:/|$)")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]  # names lower-cased


@dataclass
class FakeKube:
    namespaces: set[str] = field(default_factory=lambda: {"barlow"})
    crd: bool = True  # whether the kubeflow.org/v1 API (the PyTorchJob CRD) is installed
    trainer: bool = True  # whether the trainer.kubeflow.org/v1alpha1 API (the TrainJob CRD) is installed
    forbidden: bool = False  # every request answered 403, as for a user without RBAC
    # (group/version, namespace, plural) -> name -> object
    objects: dict[tuple[str, str, str], dict[str, dict]] = field(default_factory=dict)
    kueue: str | None = "v1beta1"  # the kueue.x-k8s.io version served (None: Kueue not installed)
    pods: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    pod_logs: dict[tuple[str, str], str] = field(default_factory=dict)
    phases: dict[str, list[str]] = field(default_factory=dict)  # job name -> conditions revealed one per GET
    # job name -> {"status": ..., "spec": {...}} changes applied one per GET (a TrainJob's, or Kueue's suspend/resume)
    scripted: dict[str, list[dict]] = field(default_factory=dict)
    drops: list[bool] = field(default_factory=list)  # per coming object GET: True hangs up without answering
    # plural -> message: a create of that resource denied by an admission webhook (422), as Trainer's or Kueue's
    denies: dict[str, str] = field(default_factory=dict)
    delete_fails: set[str] = field(default_factory=set)  # plurals whose DELETE answers 503, as an overloaded API server
    requests: list[Request] = field(default_factory=list)
    # a folder to make a self-signed certificate in: served over HTTPS, reached with insecure-skip-tls-verify
    # (as kind and self-signed on-prem clusters are), so urllib3 warns on every request
    tls_dir: Path | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        if self.tls_dir is not None:
            self._server.socket = _self_signed(self.tls_dir).wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> FakeKube:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls_dir else 'http'}://{host}:{port}"

    def kubeconfig(self, path: Path, extra_contexts: dict[str, str] | None = None, current: str = "fake") -> Path:
        """A kubeconfig whose context `fake` points here; extra_contexts maps more context names to server URLs."""
        servers = {"fake": self.url, **(extra_contexts or {})}
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": current,
            "clusters": [{"name": n, "cluster": {"server": u, **({"insecure-skip-tls-verify": True} if self.tls_dir else {})}}
                         for n, u in servers.items()],
            "users": [{"name": USER, "user": {"token": TOKEN}}],
            "contexts": [{"name": n, "context": {"cluster": n, "user": USER}} for n in servers],
        }))
        return path

    # -- what tests look at and set up -------------------------------------------------------------

    def calls(self, method: str | None = None, prefix: str = "") -> list[Request]:
        return [r for r in self.requests if (method is None or r.method == method) and r.path.startswith(prefix)]

    def stored(self, plural: str = "pytorchjobs", ns: str = "barlow", group: str = "kubeflow.org/v1") -> dict[str, dict]:
        return self.objects.get((group, ns, plural), {})

    def add_pod(self, ns: str, name: str, labels: dict[str, str], log: str = "", created: str = "2026-01-01T00:00:00Z",
                status: dict | None = None) -> None:
        self.pods.append({"metadata": {"name": name, "namespace": ns, "labels": labels, "creationTimestamp": created,
                                       "uid": str(uuid.uuid4())}, "status": status or {"phase": "Running"}})
        self.pod_logs[(ns, name)] = log

    def add_event(self, ns: str, pod: str, reason: str, message: str, type: str = "Warning",
                  at: str = "2026-01-01T00:01:00Z") -> None:
        """An event about a pod, as the scheduler or kubelet records it."""
        self.events.append({"metadata": {"name": f"{pod}.{uuid.uuid4().hex[:16]}", "namespace": ns},
                            "involvedObject": {"kind": "Pod", "name": pod, "namespace": ns}, "reason": reason,
                            "message": message, "type": type, "lastTimestamp": at, "count": 1})

    def add_workload(self, ns: str, job: dict, conditions: list[dict], cluster_queue: str = "") -> None:
        """Kueue's Workload for a stored job: labelled with the job's uid and owned by it, as Kueue creates it."""
        meta = job["metadata"]
        name = f"{job['kind'].lower()}-{meta['name']}-{uuid.uuid4().hex[:5]}"
        status: dict = {"conditions": conditions}
        if cluster_queue:
            status["admission"] = {"clusterQueue": cluster_queue, "podSetAssignments": []}
        self.objects.setdefault((f"kueue.x-k8s.io/{self.kueue}", ns, "workloads"), {})[name] = {
            "apiVersion": f"kueue.x-k8s.io/{self.kueue}", "kind": "Workload",
            "metadata": {"name": name, "namespace": ns, "labels": {"kueue.x-k8s.io/job-uid": meta["uid"]},
                         "creationTimestamp": "2026-01-01T00:00:01Z",
                         "ownerReferences": [{"apiVersion": job["apiVersion"], "kind": job["kind"], "name": meta["name"],
                                              "uid": meta["uid"], "controller": True}]},
            "spec": {"queueName": meta["labels"].get("kueue.x-k8s.io/queue-name", "")},
            "status": status}

    def set_conditions(self, name: str, ns: str, *types: str, message: str = "") -> None:
        obj = self.stored(ns=ns)[name]
        obj["status"] = _status(types, message)


def _self_signed(folder: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1 (made by openssl, as a cluster's CA would)."""
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def _status(types: tuple[str, ...] | list[str], message: str = "") -> dict:
    conds = [{"type": t, "status": "True" if i == len(types) - 1 else "False", "reason": f"PyTorchJob{t}",
              "message": message if i == len(types) - 1 else ""} for i, t in enumerate(types)]
    return {"conditions": conds, "replicaStatuses": {"Master": {"active": 1}}, "startTime": "2026-01-01T00:00:00Z"}


def _status_body(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: maps merge, null deletes a key, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _match_labels(obj: dict, selector: str | None) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    pairs = [p.split("=", 1) for p in (selector or "").split(",") if p]
    return all(labels.get(k) == v for k, v in pairs)


def _handler(fake: FakeKube) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _chunked(self, parts: list[str]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in parts:
                data = part.encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

        def _handle(self, method: str) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            with fake._lock:
                fake.requests.append(Request(method, url.path, query, body, {k.lower(): v for k, v in self.headers.items()}))
                self._route(method, url.path.rstrip("/") or "/", query, body)

        def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> None:
            if fake.forbidden:
                m = NAMESPACED.match(path)
                resource = f"{m['plural']}.{m['group']}" if m else "pods"
                ns = m["ns"] if m else ""
                verb = {"POST": "create", "DELETE": "delete", "PATCH": "patch"}.get(method, "get")
                return self._send(403, _status_body(403, "Forbidden", f'{resource} is forbidden: User "{USER}" cannot {verb} '
                                                    f'resource "{resource.split(".")[0]}" in the namespace "{ns}"'))
            if path.startswith("/apis/kubeflow.org") and not fake.crd:
                return self._send(404, _status_body(404, "NotFound", "the server could not find the requested resource"))
            if path.startswith("/apis/trainer.kubeflow.org") and not fake.trainer:
                return self._send(404, _status_body(404, "NotFound", "the server could not find the requested resource"))
            if path == "/apis/trainer.kubeflow.org/v1alpha1" and method == "GET":
                return self._send(200, {"kind": "APIResourceList", "apiVersion": "v1",
                                        "groupVersion": "trainer.kubeflow.org/v1alpha1",
                                        "resources": [{"name": "trainjobs", "singularName": "trainjob", "namespaced": True,
                                                       "kind": "TrainJob", "verbs": ["create", "delete", "get", "list"]}]})
            if path == "/apis/kubeflow.org/v1" and method == "GET":
                return self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "kubeflow.org/v1",
                                        "resources": [{"name": "pytorchjobs", "singularName": "pytorchjob", "namespaced": True,
                                                       "kind": "PyTorchJob", "verbs": ["create", "delete", "get", "list"]}]})
            if (m := KUEUE.match(path)) and m["version"] != fake.kueue:
                return self._send(404, _status_body(404, "NotFound", "the server could not find the requested resource"))
            if m := NAMESPACED.match(path):
                return self._objects(method, f"{m['group']}/{m['version']}", m["ns"], m["plural"], m["name"], query, body)
            if (m := PODS.match(path)) and method == "GET":
                items = [p for p in fake.pods
                         if p["metadata"]["namespace"] == m["ns"] and _match_labels(p, query.get("labelSelector"))]
                return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
            if (m := EVENTS.match(path)) and method == "GET":
                about = dict(p.split("=", 1) for p in (query.get("fieldSelector") or "").split(",") if p)
                items = [e for e in fake.events if e["metadata"]["namespace"] == m["ns"]
                         and all(e["involvedObject"].get(k.removeprefix("involvedObject.")) == v for k, v in about.items())]
                return self._send(200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": items})
            if (m := POD_LOG.match(path)) and method == "GET":
                log = fake.pod_logs.get((m["ns"], m["name"]))
                if log is None:
                    missing = _status_body(404, "NotFound", f'pods "{m["name"]}" not found', {"name": m["name"], "kind": "pods"})
                    return self._send(404, missing)
                if query.get("follow", "").lower() == "true":  # the python client sends True/False
                    return self._chunked(log.splitlines(keepends=True))
                return self._send(200, log, "text/plain")
            return self._send(404, "404 page not found", "text/plain")

        def _objects(self, method: str, gv: str, ns: str, plural: str, name: str | None, query: dict, body: Any) -> None:
            store = fake.objects.setdefault((gv, ns, plural), {})
            group = gv.split("/")[0]
            not_found = _status_body(404, "NotFound", f'{plural}.{group} "{name}" not found',
                                     {"name": name, "group": group, "kind": plural})
            if name is None and method == "POST":
                if ns not in fake.namespaces:
                    return self._send(404, _status_body(404, "NotFound", f'namespaces "{ns}" not found',
                                                        {"name": ns, "kind": "namespaces"}))
                new = body["metadata"]["name"]
                if plural in fake.denies:
                    return self._send(422, _status_body(422, "Invalid", f'admission webhook denied the request: '
                                                        f'{fake.denies[plural]}', {"name": new, "group": group, "kind": plural}))
                if new in store:
                    return self._send(409, _status_body(409, "AlreadyExists", f'{plural}.{group} "{new}" already exists',
                                                        {"name": new, "group": group, "kind": plural}))
                unknown = _unknown_fields(plural, body) if query.get("fieldValidation") == "Strict" else []
                if unknown:  # as kube-apiserver answers a create with fieldValidation=Strict
                    kind = body.get("kind", plural)
                    return self._send(400, _status_body(400, "BadRequest", f'{kind} in version "{gv.split("/")[-1]}" '
                                                        f'cannot be handled as a {kind}: strict decoding error: '
                                                        + ", ".join(f'unknown field "{u}"' for u in unknown)))
                obj = json.loads(json.dumps(body))
                obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp="2026-01-01T00:00:00Z", resourceVersion="1")
                if query.get("dryRun") != "All":
                    store[new] = obj
                return self._send(201, obj)
            if name is None and method == "GET":
                items = [o for o in store.values() if _match_labels(o, query.get("labelSelector"))]
                return self._send(200, {"kind": "List", "apiVersion": gv, "metadata": {}, "items": items})
            if name not in store:
                return self._send(404, not_found)
            if method == "GET":
                if fake.drops and fake.drops.pop(0):  # as an API server restarting mid-request
                    self.close_connection = True
                    return None
                if fake.phases.get(name):  # reveal the next scripted phase on each read
                    seen = fake.phases[name].pop(0)
                    store[name]["status"] = _status(store[name].get("_seen", []) + [seen], message=f"job {seen.lower()}")
                    store[name]["_seen"] = store[name].get("_seen", []) + [seen]
                if fake.scripted.get(name):
                    change = fake.scripted[name].pop(0)
                    store[name]["spec"].update(change.get("spec", {}))
                    store[name]["status"] = change.get("status", store[name].get("status"))
                return self._send(200, {k: v for k, v in store[name].items() if k != "_seen"})
            if method == "DELETE":
                if plural in fake.delete_fails:
                    return self._send(503, _status_body(503, "ServiceUnavailable", "the server is currently unable to "
                                                        "handle the request"))
                obj = store.pop(name)
                return self._send(200, obj)
            if method == "PATCH":
                if self.headers.get("Content-Type") != "application/merge-patch+json":
                    return self._send(415, _status_body(415, "UnsupportedMediaType", "this fake applies JSON merge patches only"))
                store[name] = _merge_patch(store[name], body)
                return self._send(200, store[name])
            return self._send(405, _status_body(405, "MethodNotAllowed", f"{method} not supported here"))

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_DELETE(self) -> None:
            self._handle("DELETE")

        def do_PATCH(self) -> None:
            self._handle("PATCH")

    return Handler


# -- pod statuses as kubelet and the scheduler write them ------------------------------------------------------------

def _container(name: str, image: str, state: dict, last: dict | None = None, restarts: int = 0,
               ready: bool = False) -> dict:
    return {"name": name, "image": image, "imageID": "", "ready": ready, "restartCount": restarts, "started": ready,
            "state": state, "lastState": last or {}}


def _condition(kind: str, status: bool, reason: str = "", message: str = "") -> dict:
    cond = {"type": kind, "status": "True" if status else "False", "lastTransitionTime": "2026-01-01T00:00:05Z"}
    return {**cond, **({"reason": reason} if reason else {}), **({"message": message} if message else {})}


def unschedulable(message: str) -> dict:
    """Pending: the scheduler found no node (its message on the PodScheduled condition)."""
    return {"phase": "Pending", "qosClass": "Guaranteed",
            "conditions": [_condition("PodScheduled", False, "Unschedulable", message)]}


def pending_without_message() -> dict:
    """Pending and not scheduled, with the reason only in the pod's events (FailedScheduling)."""
    return {"phase": "Pending", "conditions": [_condition("PodScheduled", False, "Unschedulable")]}


def image_pull(container: str, image: str, reason: str = "ImagePullBackOff") -> dict:
    """Scheduled, the image cannot be pulled (ErrImagePull, then ImagePullBackOff)."""
    message = (f'Back-off pulling image "{image}"' if reason == "ImagePullBackOff" else
               f'failed to pull and unpack image "{image}": failed to resolve reference "{image}": not found')
    return {"phase": "Pending", "conditions": [_condition("PodScheduled", True), _condition("Ready", False, "ContainersNotReady")],
            "containerStatuses": [_container(container, image, {"waiting": {"reason": reason, "message": message}})]}


def oom_killed(container: str, image: str, exit_code: int = 137) -> dict:
    """The training container killed by the kernel for passing its memory limit (restartPolicy Never: the pod fails)."""
    ended = {"terminated": {"exitCode": exit_code, "reason": "OOMKilled", "startedAt": "2026-01-01T00:02:00Z",
                            "finishedAt": "2026-01-01T00:09:00Z", "containerID": "containerd://1"}}
    return {"phase": "Failed", "conditions": [_condition("PodScheduled", True), _condition("Ready", False, "PodFailed")],
            "containerStatuses": [_container(container, image, ended)]}


def crash_loop(container: str, image: str, last_reason: str = "OOMKilled", exit_code: int = 137) -> dict:
    """Restarted in place and crashing again: waiting in CrashLoopBackOff, the last run's end in lastState."""
    message = f"back-off 5m0s restarting failed container={container} pod=x"
    last = {"terminated": {"exitCode": exit_code, "reason": last_reason, "startedAt": "2026-01-01T00:02:00Z",
                           "finishedAt": "2026-01-01T00:09:00Z", "containerID": "containerd://2"}}
    return {"phase": "Running", "conditions": [_condition("PodScheduled", True), _condition("Ready", False, "ContainersNotReady")],
            "containerStatuses": [_container(container, image, {"waiting": {"reason": "CrashLoopBackOff", "message": message}},
                                             last, restarts=4)]}


def running(container: str, image: str) -> dict:
    return {"phase": "Running", "conditions": [_condition("PodScheduled", True), _condition("Ready", True)],
            "containerStatuses": [_container(container, image, {"running": {"startedAt": "2026-01-01T00:02:00Z"}},
                                             ready=True)]}


SCHEMAS = Path(__file__).resolve().parents[3] / "shared" / "schemas"  # the real CRDs, read in place
CRD_FILES = {"trainjobs": "trainer.kubeflow.org_trainjobs.yaml", "pytorchjobs": "kubeflow.org_pytorchjobs.yaml"}


def _unknown_fields(plural: str, body: dict) -> list[str]:
    """The fields of `body` its CRD's schema does not declare (the paths kube-apiserver names), for the kinds whose
    CRD is in shared/schemas; metadata is the API server's own and not checked here."""
    path = SCHEMAS / CRD_FILES.get(plural, "-")
    if not path.exists():
        return []
    crd = yaml.safe_load(path.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return [u for k, v in body.items() if k not in ("apiVersion", "kind", "metadata")
            for u in _walk(v, (schema.get("properties") or {}).get(k), k)] + [
            k for k in body if k not in ("apiVersion", "kind", "metadata") and k not in (schema.get("properties") or {})]


def _walk(value: Any, schema: dict | None, path: str) -> list[str]:
    if schema is None or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, list):
        return [u for i, item in enumerate(value) for u in _walk(item, schema.get("items"), path)]
    if not isinstance(value, dict):
        return []
    if "properties" not in schema:
        extra = schema.get("additionalProperties")
        return [u for k, v in value.items() for u in _walk(v, extra if isinstance(extra, dict) else None, f"{path}.{k}")]
    found = []
    for k, v in value.items():
        if k not in schema["properties"]:
            found.append(f"{path}.{k}")
        elif k != "metadata":  # a pod template's metadata is left open in these CRDs
            found += _walk(v, schema["properties"][k], f"{path}.{k}")
    return found
