"""Submit, watch, read the logs of and delete barlow's jobs with the kubernetes client: this module talks to the API
(`render` renders). What differs between a PyTorchJob and a TrainJob is asked of their `Backend` (launch/backend.py).

The client is configured from the kubeconfig ($KUBECONFIG or ~/.kube/config, `--context` picks a context) or, inside
a pod, from the in-cluster service account. Every API call goes through `_call`, and every failure a user can act on
becomes one `ClusterError` line there: no cluster configured, a missing namespace, the job's CRD not installed,
forbidden, another job under the same name.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from barlow.launch import backend as backends
from barlow.launch.backend import FAILED, Backend
from barlow.launch.manifest import LABEL_HASH, MANAGED_BY, RenderError
from barlow.launch.render import render
from barlow.spec import ClusterSpec, EvalRunSpec, PretrainSpec, RunSpec, SpecError, with_fields

REQUEST_TIMEOUT_S = 30


class ClusterError(Exception):
    """A cluster operation that failed for a reason the user can act on; the message is one line."""


class ClusterUnreachable(ClusterError):
    """The API server could not be reached (transient: waiting loops retry)."""


class NotFound(ClusterError):
    """The object does not exist (its namespace and its CRD do)."""


class AlreadyExists(ClusterError):
    """An object of that name exists already (409 on create)."""


class WaitTimedOut(ClusterError):
    """`wait` gave up after its timeout while the job was still unfinished."""


@dataclass(frozen=True)
class Resource:
    """A namespaced resource served under /apis (custom resources and batch/v1 Jobs alike)."""

    group: str
    version: str
    plural: str
    what: str  # how messages name it
    missing: str = ""  # the message when its CRD is not installed ("" for built-in resources)

    def args(self, namespace: str) -> tuple[str, str, str, str]:
        return self.group, self.version, namespace, self.plural


def resource(b: Backend) -> Resource:
    return Resource(b.group, b.version, b.plural, b.what, b.crd_missing)


JOBS = Resource("batch", "v1", "jobs", "job")
NETWORK_POLICIES = Resource("networking.k8s.io", "v1", "networkpolicies", "networkpolicy")


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
    """A PyTorchJob's or TrainJob's state as `barlow status` shows it."""

    name: str
    namespace: str
    kind: str
    phase: str  # Pending, Queued, or the backend's latest true condition (Running, Succeeded|Complete, Failed, ...)
    message: str = ""
    replicas: dict[str, dict[str, int]] = field(default_factory=dict)
    created: str = ""
    started: str = ""
    finished: str = ""
    spec_hash: str = ""
    what: str = "pytorchjob"
    succeeded: str = "Succeeded"  # the backend's phase of success
    trainer_status: dict[str, Any] = field(default_factory=dict)  # a TrainJob's status.trainerStatus (KEP-2779), as given

    @property
    def finished_ok(self) -> bool:
        return self.phase == self.succeeded

    @property
    def done(self) -> bool:
        return self.phase in (self.succeeded, FAILED)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


NAMESPACE_ENV = "BARLOW_NAMESPACE"
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# what a kubeconfig that cannot be read raises: the client's own errors, and its YAML parser's on a malformed file
_KUBECONFIG_ERRORS = (config.ConfigException, OSError, ValueError, TypeError, AttributeError, KeyError, yaml.YAMLError)


def _kubeconfig_path() -> str:
    return os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


def _kubeconfig_exists(path: str) -> bool:
    return any(p and os.path.exists(os.path.expanduser(p)) for p in path.split(os.pathsep))


def _kubeconfig_problem(path: str, e: Exception) -> ClusterError:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        return ClusterError(f"kubeconfig {path}: not valid YAML (line {e.problem_mark.line + 1}: {e.problem})")
    if isinstance(e, yaml.YAMLError):
        return ClusterError(f"kubeconfig {path}: not valid YAML ({_one_line(e)})")
    if isinstance(e, TypeError | AttributeError | KeyError):
        return ClusterError(f"kubeconfig {path}: not a kubeconfig (clusters, contexts, users and current-context "
                            f"as `kubectl config view` prints them)")
    return ClusterError(f"kubeconfig {path}: {_one_line(e)}")


def connect(context: str | None = None) -> client.ApiClient:
    """An API client from the kubeconfig (KUBECONFIG or ~/.kube/config) or, inside a pod, the in-cluster config."""
    cfg = client.Configuration()
    path = _kubeconfig_path()
    if _kubeconfig_exists(path):
        try:
            config.load_kube_config(config_file=path, context=context, client_configuration=cfg, persist_config=False)
        except _KUBECONFIG_ERRORS as e:
            raise _kubeconfig_problem(path, e) from None
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


def context_namespace(context: str | None = None) -> str | None:
    """The namespace of the kubeconfig's context (`--context`, else its current one), or inside a pod its service
    account's; None where neither names one."""
    path = _kubeconfig_path()
    if _kubeconfig_exists(path):
        try:
            contexts, current = config.list_kube_config_contexts(config_file=path)
        except _KUBECONFIG_ERRORS as e:
            raise _kubeconfig_problem(path, e) from None
        chosen = next((c for c in contexts or [] if c.get("name") == context), None) if context else current
        if context and chosen is None:
            raise ClusterError(f"kubeconfig {path}: no context '{context}' (it has: "
                               f"{', '.join(c.get('name', '?') for c in contexts or []) or 'none'})")
        return ((chosen or {}).get("context") or {}).get("namespace") or None
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            with open(SERVICE_ACCOUNT_NAMESPACE) as f:
                return f.read().strip() or None
        except OSError:  # no service account token mounted: no namespace from it
            return None
    return None


def resolve_namespace(option: str | None, spec: RunSpec | None = None, context: str | None = None) -> str:
    """The namespace every command acts in: --namespace, then $BARLOW_NAMESPACE, then the spec's cluster.namespace
    where the spec sets it, then the kubeconfig context's namespace, then cluster.namespace's default.
    Raises SpecError for a name Kubernetes would refuse, ClusterError for an unreadable kubeconfig."""
    for where, name in (("--namespace", option), (NAMESPACE_ENV, os.environ.get(NAMESPACE_ENV))):
        if name:
            try:
                return ClusterSpec(namespace=name).namespace
            except ValueError as e:  # pydantic's ValidationError is a ValueError
                raise SpecError([f"{where}: '{name}' is not a valid Kubernetes name (lowercase letters, digits, '-')"]) from e
    if spec is not None and "namespace" in spec.cluster.model_fields_set:
        return spec.cluster.namespace
    return context_namespace(context) or ClusterSpec.model_fields["namespace"].default


def _body(e: ApiException) -> dict[str, Any]:
    try:
        body = json.loads(e.body or "")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _crd_installed(api: client.ApiClient, res: Resource) -> bool:
    objects = client.CustomObjectsApi(api)
    try:
        found = _call(api, "", objects.get_api_resources, res.group, res.version, _request_timeout=REQUEST_TIMEOUT_S)
    except NotFound:
        return False
    return any(r.name == res.plural for r in found.resources or [])


def _translate(api: client.ApiClient, e: Exception, namespace: str, res: Resource | None, name: str) -> ClusterError:
    """One line for an API or connection error: the one place that reads HTTP statuses."""
    if not isinstance(e, ApiException):
        reason = getattr(e, "reason", None) or e
        return ClusterUnreachable(f"cannot reach the Kubernetes API at {api.configuration.host}: {_one_line(reason)}")
    body = _body(e)
    message = _one_line(body.get("message") or e.reason or "")
    if e.status == 401:
        return ClusterError(f"unauthorized: the API server at {api.configuration.host} rejected the kubeconfig's credentials")
    if e.status == 403:
        return ClusterError(f"forbidden: {message} (ask a cluster admin to bind the Role in k8s/base/role-submitter.yaml "
                            f"in namespace '{namespace}')")
    if e.status == 404 and (body.get("details") or {}).get("kind") == "namespaces":
        return ClusterError(f"namespace '{namespace}' does not exist: create it (kubectl apply -k k8s/base) or pass --namespace")
    if e.status == 404 and res is not None and res.missing and not _crd_installed(api, res):
        return ClusterError(res.missing)
    if e.status == 404:
        found = f"no {res.what} {name} in namespace '{namespace}'" if res is not None and name else None
        return NotFound(found or f"the Kubernetes API answered 404 {e.reason}: {message}")
    if e.status == 409:
        return AlreadyExists(f"{res.what if res else 'object'} {name} already exists in namespace '{namespace}'")
    if e.status in (400, 422):  # 400: strict field validation (an unknown field), 422: invalid
        return ClusterError(f"the API server rejected {res.what if res else 'object'} {name}: {message}")
    if e.status is not None and e.status >= 500:
        return ClusterUnreachable(f"the Kubernetes API answered {e.status} {e.reason}: {message}")
    return ClusterError(f"the Kubernetes API answered {e.status} {e.reason}: {message}")


def _call(api: client.ApiClient, namespace: str, fn: Callable[..., Any], *args: Any, res: Resource | None = None,
          name: str = "", **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, an API call on `res` (object `name`) in `namespace`; failures raise ClusterError."""
    try:
        return fn(*args, **kwargs)
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
        raise _translate(api, e, namespace, res, name) from None


def _read(api: client.ApiClient, res: Resource, name: str, namespace: str) -> dict[str, Any] | None:
    """The object, or None where there is none (raises ClusterError where the namespace or the CRD is missing)."""
    objects = client.CustomObjectsApi(api)
    try:
        return _call(api, namespace, objects.get_namespaced_custom_object, *res.args(namespace), name, res=res, name=name,
                     _request_timeout=REQUEST_TIMEOUT_S)
    except NotFound:
        return None


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


def _create(api: client.ApiClient, res: Resource, body: dict[str, Any], dry_run: bool,
            same: Callable[[dict[str, Any]], Submitted]) -> Submitted:
    """Create `body`; where someone created it between our read and this create, `same(existing)` decides."""
    name, ns = body["metadata"]["name"], body["metadata"]["namespace"]
    objects = client.CustomObjectsApi(api)
    try:
        created = _call(api, ns, objects.create_namespaced_custom_object, *res.args(ns), body, res=res, name=name,
                        dry_run="All" if dry_run else None, field_validation="Strict",  # an unknown field: refused
                        _request_timeout=REQUEST_TIMEOUT_S)
    except AlreadyExists:
        return same(_read(api, res, name, ns) or {"metadata": {}})
    outcome = "valid (server dry run; nothing created)" if dry_run else "created"
    return Submitted(res.what, name, ns, outcome, (created.get("metadata") or {}).get("uid"))


def _submit_object(api: client.ApiClient, res: Resource, body: dict[str, Any], dry_run: bool) -> Submitted:
    """Create `body` unless an object of that name exists: same spec hash → already submitted, other → error."""
    existing = _read(api, res, body["metadata"]["name"], body["metadata"]["namespace"])
    if existing is not None:
        return _same_or_conflict(res, existing, body)
    return _create(api, res, body, dry_run, lambda found: _same_or_conflict(res, found, body))


def _same_policy_or_conflict(existing: dict[str, Any], body: dict[str, Any]) -> Submitted:
    """A job's NetworkPolicy depends on the job's name only: barlow's with the same rules is kept, whatever spec
    created it; any other is an error (barlow would not know what it admits)."""
    meta, name, ns = existing.get("metadata") or {}, body["metadata"]["name"], body["metadata"]["namespace"]
    if not all((meta.get("labels") or {}).get(k) == v for k, v in MANAGED_BY.items()):
        raise ClusterError(f"networkpolicy {name} already exists in namespace '{ns}' and was not created by barlow; "
                           "rename the run (spec field name)")
    if existing.get("spec") != body["spec"]:
        raise ClusterError(f"networkpolicy {name} in namespace '{ns}' admits other pods than this job's: delete it "
                           f"(kubectl -n {ns} delete networkpolicy {name}) and submit again")
    return Submitted(NETWORK_POLICIES.what, name, ns, "already submitted", meta.get("uid"))


def _own_policy(api: client.ApiClient, policy: dict[str, Any], job: Submitted, b: Backend) -> None:
    """Make the job the policy's owner (the garbage collector deletes the policy with the job), and give the policy
    the labels of the spec that submitted the job. A JSON merge patch: the owner list is replaced whole."""
    name, ns = policy["metadata"]["name"], policy["metadata"]["namespace"]
    owner = {"apiVersion": b.api_version, "kind": b.kind, "name": job.name, "uid": job.uid}
    patch = {"metadata": {"ownerReferences": [owner], "labels": policy["metadata"]["labels"]}}
    objects = client.CustomObjectsApi(api)
    _call(api, ns, objects.patch_namespaced_custom_object, *NETWORK_POLICIES.args(ns), name, patch,
          res=NETWORK_POLICIES, name=name, _request_timeout=REQUEST_TIMEOUT_S)


def _delete_policy(api: client.ApiClient, policy: dict[str, Any]) -> None:
    name, ns = policy["metadata"]["name"], policy["metadata"]["namespace"]
    objects = client.CustomObjectsApi(api)
    try:
        _call(api, ns, objects.delete_namespaced_custom_object, *NETWORK_POLICIES.args(ns), name,
              res=NETWORK_POLICIES, name=name, _request_timeout=REQUEST_TIMEOUT_S)
    except NotFound:  # gone already: what we wanted
        pass


def _submit_job(api: client.ApiClient, b: Backend, policy: dict[str, Any], job: dict[str, Any],
                dry_run: bool) -> list[Submitted]:
    """The job's NetworkPolicy, then the job, then the job made the policy's owner: no pod of the job starts
    without its policy, and deleting the job deletes the policy. Nothing is left half-written: the job is read first
    (a missing CRD, a name taken by another spec: no write at all), and a policy created here is deleted again when
    creating the job fails. A job already there gets its policy back if the policy is missing or has lost its owner."""
    res = resource(b)
    existing = _read(api, res, job["metadata"]["name"], job["metadata"]["namespace"])
    done = _same_or_conflict(res, existing, job) if existing is not None else None
    found = _read(api, NETWORK_POLICIES, policy["metadata"]["name"], policy["metadata"]["namespace"])
    fence = _same_policy_or_conflict(found, policy) if found is not None else None
    if fence is None:
        fence = _create(api, NETWORK_POLICIES, policy, dry_run, lambda other: _same_policy_or_conflict(other, policy))
    if done is None:
        try:
            done = _create(api, res, job, dry_run, lambda other: _same_or_conflict(res, other, job))
        except ClusterError as refused:
            if fence.outcome == "created":
                try:
                    _delete_policy(api, policy)
                except ClusterError as e:
                    raise type(refused)(f"{refused}; and its networkpolicy {policy['metadata']['name']} is left "
                                        f"behind: {e}") from None
            raise
    owners = [o.get("uid") for o in ((found or {}).get("metadata") or {}).get("ownerReferences") or []]
    if not dry_run and done.uid and owners != [done.uid]:
        _own_policy(api, policy, done, b)
    return [fence, done]


def _rendered(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except RenderError as e:
        raise ClusterError(str(e)) from None


def submit(api: client.ApiClient, spec: PretrainSpec | EvalRunSpec, what: str | None = None,
           dry_run: bool = False) -> list[Submitted]:
    """Create the job for `spec` in its backend (what: pretrain | eval | pipeline; default the spec's kind).
    Raises RenderError (a spec problem) before sending anything when the spec cannot be rendered.

    Every job comes with its NetworkPolicy, created before it and owned by it (`_submit_job`). `pipeline` creates the
    pretrain job and a follow-up Job, owned by it, that submits the eval once pretrain succeeds. Resubmitting the same
    spec is a no-op ("already submitted").
    """
    docs, b = render(spec, what), backends.of(spec)  # checked and rendered, every object, before any is sent
    policy, job, *follow_up = docs
    fence, first = _submit_job(api, b, policy, job, dry_run)
    if not follow_up:
        return [fence, first]
    follow = follow_up[0]
    if first.uid:  # deleting the pretrain job deletes its follow-up, so no eval starts for a deleted run
        follow["metadata"]["ownerReferences"] = [{"apiVersion": b.api_version, "kind": b.kind,
                                                  "name": first.name, "uid": first.uid}]
    return [fence, first, _submit_object(api, JOBS, follow, dry_run)]


def _status_of(obj: dict[str, Any], b: Backend) -> JobStatus:
    meta, st = obj.get("metadata") or {}, obj.get("status") or {}
    labels = meta.get("labels") or {}
    phase, message = b.phase(obj)
    return JobStatus(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        kind=labels.get("barlow.dev/kind", ""),
        phase=phase,
        message=message,
        replicas=b.replicas(st),
        created=meta.get("creationTimestamp", ""),
        started=st.get("startTime", ""),
        finished=st.get("completionTime", ""),
        spec_hash=labels.get(LABEL_HASH, ""),
        what=b.what,
        succeeded=b.succeeded,
        trainer_status=st.get("trainerStatus") or {},
    )


def status(api: client.ApiClient, name: str, namespace: str, b: Backend) -> JobStatus:
    obj = _read(api, resource(b), name, namespace)
    if obj is None:
        raise ClusterError(f"no {b.what} {name} in namespace '{namespace}' (see `barlow list -n {namespace}`)")
    return _status_of(obj, b)


def wait(api: client.ApiClient, name: str, namespace: str, timeout: float | None = None, poll: float = 10.0,
         on_change: Callable[[JobStatus], None] | None = None, sleep: Callable[[float], None] = time.sleep,
         *, b: Backend) -> JobStatus:
    """Poll until the job succeeds or fails (a queued job is still waited for); returns its last status. Once the API
    server has answered, later connection failures are retried rather than ending the wait."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    while True:
        try:
            st = status(api, name, namespace, b)
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
            raise WaitTimedOut(f"timed out after {timeout:g}s waiting for {b.what} {name} (phase {phase})")
        sleep(poll)


def submit_after(api: client.ApiClient, spec: EvalRunSpec, after: str, poll: float = 30.0,
                 on_change: Callable[[JobStatus], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> list[Submitted]:
    """Wait for job `after` (the spec's backend, in its namespace) and submit `spec` once it has succeeded."""
    b = backends.of(spec)
    st = wait(api, after, spec.cluster.namespace, poll=poll, on_change=on_change, sleep=sleep, b=b)
    if not st.finished_ok:
        raise ClusterError(f"{b.what} {after} {st.phase.lower()}: {st.message or 'no message'}; the eval is not started")
    return submit(api, spec, "eval")


def logs(api: client.ApiClient, name: str, namespace: str, replica: str = "master", follow: bool = False,
         write: Callable[[str], Any] = print, *, b: Backend) -> None:
    """Stream the training container's log of one replica (master; worker-N for a PyTorchJob, node-N for a TrainJob)."""
    selector = _rendered(b.pod_selector, name, replica)
    core = client.CoreV1Api(api)
    pods = _call(api, namespace, core.list_namespaced_pod, namespace, label_selector=selector,
                 _request_timeout=REQUEST_TIMEOUT_S).items
    if not pods:
        phase = status(api, name, namespace, b).phase  # raises the clearer error when the job itself is missing
        raise ClusterError(f"no pod yet for replica {replica} of {b.what} {name} (phase {phase})")
    pod = max(pods, key=lambda p: p.metadata.creation_timestamp or 0)  # the latest attempt after restarts
    resp = _call(api, namespace, core.read_namespaced_pod_log, pod.metadata.name, namespace, container=b.container,
                 follow=follow, _preload_content=False, _request_timeout=None if follow else REQUEST_TIMEOUT_S)
    try:
        for chunk in resp.stream(decode_content=True):
            write(chunk.decode("utf-8", errors="replace"))
    finally:
        resp.release_conn()


def delete(api: client.ApiClient, name: str, namespace: str, b: Backend) -> None:
    """Delete the job; the garbage collector removes its pods, services, NetworkPolicy and a pipeline's follow-up Job
    (each owned by the job)."""
    res, objects = resource(b), client.CustomObjectsApi(api)
    _call(api, namespace, objects.delete_namespaced_custom_object, *res.args(namespace), name, res=res, name=name,
          propagation_policy="Background", _request_timeout=REQUEST_TIMEOUT_S)


def list_jobs(api: client.ApiClient, namespace: str, b: Backend) -> list[JobStatus]:
    """barlow's jobs of one backend in the namespace, oldest first."""
    selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
    res, objects = resource(b), client.CustomObjectsApi(api)
    found = _call(api, namespace, objects.list_namespaced_custom_object, *res.args(namespace), res=res,
                  label_selector=selector, _request_timeout=REQUEST_TIMEOUT_S)
    return sorted((_status_of(o, b) for o in found.get("items") or []), key=lambda s: (s.created, s.name))


def spec_namespace(spec: RunSpec, option: str | None, context: str | None = None) -> RunSpec:
    """The spec placed in the namespace `resolve_namespace` picks, so the manifest and the pod's spec agree."""
    namespace = resolve_namespace(option, spec, context)
    if namespace == spec.cluster.namespace:
        return spec
    return with_fields(spec, {"cluster.namespace": namespace}, "--namespace")
