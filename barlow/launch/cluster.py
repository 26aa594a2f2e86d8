"""Submit, watch, read the logs of and delete barlow's PyTorchJobs with the kubernetes client.

The client is configured from the kubeconfig ($KUBECONFIG or ~/.kube/config, `--context` picks a context) or, inside
a pod, from the in-cluster service account. Everything a user can act on becomes one `ClusterError` line: no cluster
configured, a missing namespace, the PyTorchJob CRD not installed, forbidden, another job under the same name.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from barlow.launch.kubernetes import CONTAINER as TRAINING_CONTAINER
from barlow.launch.kubernetes import (
    GROUP,
    LABEL_HASH,
    MANAGED_BY,
    OPERATOR_JOB_NAME,
    OPERATOR_REPLICA_INDEX,
    OPERATOR_REPLICA_TYPE,
    PLURAL,
    VERSION,
    build_follow_up,
    build_pytorchjob,
    eval_of,
    to_dict,
)
from barlow.spec import EvalRunSpec, PretrainSpec, RunSpec, parse_spec

FINISHED = ("Succeeded", "Failed")
CRD_MISSING = ("the PyTorchJob CRD (pytorchjobs.kubeflow.org/v1) is not installed in this cluster: "
               "install the Kubeflow training operator (README: Run on a cluster)")
REQUEST_TIMEOUT_S = 30


class ClusterError(Exception):
    """A cluster operation that failed for a reason the user can act on; the message is one line."""


class ClusterUnreachable(ClusterError):
    """The API server could not be reached (transient: waiting loops retry)."""


@dataclass(frozen=True)
class Resource:
    """A namespaced resource served under /apis (custom resources and batch/v1 Jobs alike)."""

    group: str
    version: str
    plural: str
    what: str  # how messages name it

    def args(self, namespace: str) -> tuple[str, str, str, str]:
        return self.group, self.version, namespace, self.plural


PYTORCHJOBS = Resource(GROUP, VERSION, PLURAL, "pytorchjob")
JOBS = Resource("batch", "v1", "jobs", "job")


@dataclass(frozen=True)
class Submitted:
    """What `submit` did with one object."""

    what: str
    name: str
    namespace: str
    outcome: str  # created | already submitted | valid (server dry run; nothing created)
    uid: str | None = None


@dataclass
class JobStatus:
    """A PyTorchJob's state as `barlow status` shows it."""

    name: str
    namespace: str
    kind: str
    phase: str  # the operator's latest true condition: Created, Running, Restarting, Succeeded, Failed, or Pending
    message: str = ""
    replicas: dict[str, dict[str, int]] = field(default_factory=dict)
    created: str = ""
    started: str = ""
    finished: str = ""
    spec_hash: str = ""

    @property
    def finished_ok(self) -> bool:
        return self.phase == "Succeeded"

    @property
    def done(self) -> bool:
        return self.phase in FINISHED


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def connect(context: str | None = None) -> client.ApiClient:
    """An API client from the kubeconfig (KUBECONFIG or ~/.kube/config) or, inside a pod, the in-cluster config."""
    cfg = client.Configuration()
    path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    if any(p and os.path.exists(os.path.expanduser(p)) for p in path.split(os.pathsep)):
        try:
            config.load_kube_config(config_file=path, context=context, client_configuration=cfg, persist_config=False)
        except (config.ConfigException, OSError, ValueError, TypeError) as e:
            raise ClusterError(f"kubeconfig {path}: {_one_line(e)}") from None
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        if context:
            raise ClusterError("--context needs a kubeconfig; inside a pod there is only the in-cluster config")
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException as e:
            raise ClusterError(f"in-cluster config: {_one_line(e)}") from None
    else:
        raise ClusterError(f"no cluster configured: no kubeconfig at {path} and not running in a pod "
                           "(point KUBECONFIG at your cluster's config)")
    return client.ApiClient(cfg)


def _body(e: ApiException) -> dict[str, Any]:
    try:
        body = json.loads(e.body or "")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _crd_installed(api: client.ApiClient) -> bool:
    try:
        found = client.CustomObjectsApi(api).get_api_resources(GROUP, VERSION, _request_timeout=REQUEST_TIMEOUT_S)
    except ApiException as e:
        if e.status == 404:
            return False
        raise _translate(api, e, "") from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise _translate(api, e, "") from None
    return any(r.name == PLURAL for r in found.resources or [])


def _translate(api: client.ApiClient, e: Exception, namespace: str) -> ClusterError:
    """One line for an API or connection error."""
    if not isinstance(e, ApiException):
        reason = getattr(e, "reason", None) or e
        return ClusterUnreachable(f"cannot reach the Kubernetes API at {api.configuration.host}: {_one_line(reason)}")
    message = _one_line(_body(e).get("message") or e.reason or "")
    if e.status == 401:
        return ClusterError(f"unauthorized: the API server at {api.configuration.host} rejected the kubeconfig's credentials")
    if e.status == 403:
        return ClusterError(f"forbidden: {message} (ask a cluster admin to bind the Role in k8s/base/role-submitter.yaml "
                            f"in namespace '{namespace}')")
    if e.status == 404 and (_body(e).get("details") or {}).get("kind") == "namespaces":
        return ClusterError(f"namespace '{namespace}' does not exist: create it (kubectl apply -k k8s/base) or pass --namespace")
    if e.status == 404 and not _crd_installed(api):
        return ClusterError(CRD_MISSING)
    if e.status is not None and e.status >= 500:
        return ClusterUnreachable(f"the Kubernetes API answered {e.status} {e.reason}: {message}")
    return ClusterError(f"the Kubernetes API answered {e.status} {e.reason}: {message}")


def _call(api: client.ApiClient, namespace: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
        raise _translate(api, e, namespace) from None


def _read(api: client.ApiClient, res: Resource, name: str, namespace: str) -> dict[str, Any] | None:
    """The object, or None where there is none (raises ClusterError where the CRD itself is missing)."""
    objects = client.CustomObjectsApi(api)
    try:
        return objects.get_namespaced_custom_object(*res.args(namespace), name, _request_timeout=REQUEST_TIMEOUT_S)
    except ApiException as e:
        if e.status == 404 and not (_body(e).get("details") or {}).get("kind") == "namespaces" and _crd_installed(api):
            return None
        raise _translate(api, e, namespace) from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise _translate(api, e, namespace) from None


def _same_or_conflict(res: Resource, existing: dict[str, Any], body: dict[str, Any]) -> Submitted:
    meta, want = existing.get("metadata") or {}, body["metadata"]["labels"][LABEL_HASH]
    have = (meta.get("labels") or {}).get(LABEL_HASH)
    name, ns = body["metadata"]["name"], body["metadata"]["namespace"]
    if have == want:
        return Submitted(res.what, name, ns, "already submitted", meta.get("uid"))
    if have is None:
        raise ClusterError(f"{res.what} {name} already exists in namespace '{ns}' and was not created by barlow; "
                           "rename the run (spec field name)")
    raise ClusterError(f"{res.what} {name} already exists in namespace '{ns}' with a different spec (hash {have}, "
                       f"this spec {want}): delete it with `barlow delete {name}` or rename the run")


def _submit_object(api: client.ApiClient, res: Resource, body: dict[str, Any], dry_run: bool) -> Submitted:
    """Create `body` unless an object of that name exists: same spec hash → already submitted, other → error."""
    name, ns = body["metadata"]["name"], body["metadata"]["namespace"]
    existing = _read(api, res, name, ns)
    if existing is not None:
        return _same_or_conflict(res, existing, body)
    objects = client.CustomObjectsApi(api)
    try:
        created = objects.create_namespaced_custom_object(
            *res.args(ns), body, dry_run="All" if dry_run else None, _request_timeout=REQUEST_TIMEOUT_S)
    except ApiException as e:
        if e.status == 409:  # created by someone else between our read and our create
            return _same_or_conflict(res, _read(api, res, name, ns) or {}, body)
        if e.status == 422:
            reason = _one_line(_body(e).get("message") or e.reason)
            raise ClusterError(f"the API server rejected {res.what} {name}: {reason}") from None
        raise _translate(api, e, ns) from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise _translate(api, e, ns) from None
    outcome = "valid (server dry run; nothing created)" if dry_run else "created"
    return Submitted(res.what, name, ns, outcome, (created.get("metadata") or {}).get("uid"))


def submit(api: client.ApiClient, spec: PretrainSpec | EvalRunSpec, what: str | None = None,
           dry_run: bool = False) -> list[Submitted]:
    """Create the PyTorchJob for `spec` (what: pretrain | eval | pipeline; default the spec's kind).

    `pipeline` creates the pretrain job and a follow-up Job, owned by it, that submits the eval once pretrain succeeds.
    Resubmitting the same spec is a no-op ("already submitted").
    """
    what = what or spec.kind
    if what == "pipeline":
        if not isinstance(spec, PretrainSpec):
            raise ClusterError("a pipeline needs a pretrain spec (kind: pretrain)")
        job, follow = to_dict(build_pytorchjob(spec)), to_dict(build_follow_up(spec))  # both valid before either is sent
        first = _submit_object(api, PYTORCHJOBS, job, dry_run)
        if first.uid:  # deleting the pretrain job deletes its follow-up, so no eval starts for a deleted run
            follow["metadata"]["ownerReferences"] = [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "PyTorchJob",
                                                      "name": first.name, "uid": first.uid}]
        return [first, _submit_object(api, JOBS, follow, dry_run)]
    if what == "eval" and isinstance(spec, PretrainSpec):
        spec = eval_of(spec)
    elif what != spec.kind:
        raise ClusterError(f"this is a {spec.kind} spec: submit it as `{spec.kind}`, not `{what}`")
    return [_submit_object(api, PYTORCHJOBS, to_dict(build_pytorchjob(spec)), dry_run)]


def _status_of(obj: dict[str, Any]) -> JobStatus:
    meta, st = obj.get("metadata") or {}, obj.get("status") or {}
    true = [c for c in st.get("conditions") or [] if c.get("status") == "True"]
    labels = meta.get("labels") or {}
    return JobStatus(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        kind=labels.get("barlow.dev/kind", ""),
        phase=true[-1].get("type", "Pending") if true else "Pending",
        message=_one_line(true[-1].get("message", "")) if true else "",
        replicas={k: {s: n for s, n in (v or {}).items() if isinstance(n, int)}
                  for k, v in (st.get("replicaStatuses") or {}).items()},
        created=meta.get("creationTimestamp", ""),
        started=st.get("startTime", ""),
        finished=st.get("completionTime", ""),
        spec_hash=labels.get(LABEL_HASH, ""),
    )


def status(api: client.ApiClient, name: str, namespace: str) -> JobStatus:
    obj = _read(api, PYTORCHJOBS, name, namespace)
    if obj is None:
        raise ClusterError(f"no pytorchjob {name} in namespace '{namespace}' (see `barlow list -n {namespace}`)")
    return _status_of(obj)


def wait(api: client.ApiClient, name: str, namespace: str, timeout: float | None = None, poll: float = 10.0,
         on_change: Callable[[JobStatus], None] | None = None, sleep: Callable[[float], None] = time.sleep) -> JobStatus:
    """Poll until the job succeeds or fails; returns its last status. Once the API server has answered, later
    connection failures are retried rather than ending the wait."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    while True:
        try:
            st = status(api, name, namespace)
        except ClusterUnreachable:
            if last is None:  # never reached it: a wrong kubeconfig, not a blip
                raise
            st = None  # API server restarts and network blips must not end a days-long wait
        if st is not None and (last is None or (st.phase, st.message) != (last.phase, last.message)):
            if on_change:
                on_change(st)
            last = st
        if st is not None and st.done:
            return st
        if deadline is not None and time.monotonic() >= deadline:
            phase = last.phase if last else "unknown"
            raise ClusterError(f"timed out after {timeout:g}s waiting for pytorchjob {name} (phase {phase})")
        sleep(poll)


def submit_after(api: client.ApiClient, spec: EvalRunSpec, after: str, poll: float = 30.0,
                 on_change: Callable[[JobStatus], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> list[Submitted]:
    """Wait for pytorchjob `after` (in the spec's namespace) and submit `spec` once it has succeeded."""
    st = wait(api, after, spec.cluster.namespace, poll=poll, on_change=on_change, sleep=sleep)
    if not st.finished_ok:
        raise ClusterError(f"pytorchjob {after} {st.phase.lower()}: {st.message or 'no message'}; the eval is not started")
    return submit(api, spec, "eval")


def _replica(replica: str) -> tuple[str, int]:
    if replica == "master":
        return "master", 0
    kind, _, index = replica.partition("-")
    if kind != "worker" or not index.isdigit():
        raise ClusterError(f"--replica must be master or worker-N (N from 0), not '{replica}'")
    return "worker", int(index)


def logs(api: client.ApiClient, name: str, namespace: str, replica: str = "master", follow: bool = False,
         write: Callable[[str], Any] = print) -> None:
    """Stream the training container's log of one replica (master, or worker-N: node rank N + 1)."""
    rtype, index = _replica(replica)
    core = client.CoreV1Api(api)
    selector = f"{OPERATOR_JOB_NAME}={name},{OPERATOR_REPLICA_TYPE}={rtype},{OPERATOR_REPLICA_INDEX}={index}"
    pods = _call(api, namespace, core.list_namespaced_pod, namespace, label_selector=selector,
                 _request_timeout=REQUEST_TIMEOUT_S).items
    if not pods:
        phase = status(api, name, namespace).phase  # raises the clearer error when the job itself is missing
        raise ClusterError(f"no pod yet for replica {replica} of pytorchjob {name} (phase {phase})")
    pod = max(pods, key=lambda p: p.metadata.creation_timestamp or 0)  # the latest attempt after restarts
    resp = _call(api, namespace, core.read_namespaced_pod_log, pod.metadata.name, namespace, container=TRAINING_CONTAINER,
                 follow=follow, _preload_content=False, _request_timeout=None if follow else REQUEST_TIMEOUT_S)
    try:
        for chunk in resp.stream(decode_content=True):
            write(chunk.decode("utf-8", errors="replace"))
    finally:
        resp.release_conn()


def delete(api: client.ApiClient, name: str, namespace: str) -> None:
    """Delete the PyTorchJob; the garbage collector removes its pods, services and a pipeline's follow-up Job."""
    objects = client.CustomObjectsApi(api)
    try:
        objects.delete_namespaced_custom_object(*PYTORCHJOBS.args(namespace), name, propagation_policy="Background",
                                                _request_timeout=REQUEST_TIMEOUT_S)
    except ApiException as e:
        if e.status == 404 and _crd_installed(api):
            raise ClusterError(f"no pytorchjob {name} in namespace '{namespace}'") from None
        raise _translate(api, e, namespace) from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise _translate(api, e, namespace) from None


def list_jobs(api: client.ApiClient, namespace: str) -> list[JobStatus]:
    """barlow's PyTorchJobs in the namespace, oldest first."""
    selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
    objects = client.CustomObjectsApi(api)
    found = _call(api, namespace, objects.list_namespaced_custom_object, *PYTORCHJOBS.args(namespace),
                  label_selector=selector, _request_timeout=REQUEST_TIMEOUT_S)
    return sorted((_status_of(o) for o in found.get("items") or []), key=lambda s: (s.created, s.name))


def spec_namespace(spec: RunSpec, namespace: str | None) -> RunSpec:
    """The spec placed in `namespace` (the --namespace option), so the manifest and the pod's spec agree."""
    if not namespace or namespace == spec.cluster.namespace:
        return spec
    data = spec.model_dump(mode="json")
    data["cluster"]["namespace"] = namespace
    return parse_spec(data, "--namespace")
