"""Submit, watch, read the logs of and delete barlow's jobs: the verbs of the CLI's cluster commands, each a few
calls through launch/kubeapi.py (the client, its errors, the namespace) on objects `render` renders. What differs
between a PyTorchJob and a TrainJob is asked of their `Backend` (launch/backend.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client

from barlow.launch import backend as backends
from barlow.launch.backend import FAILED, Backend
from barlow.launch.kubeapi import (
    JOBS,
    NETWORK_POLICIES,
    REQUEST_TIMEOUT_S,
    AlreadyExists,
    ClusterError,
    ClusterUnreachable,
    NotFound,
    Resource,
    WaitTimedOut,
    call,
    read,
    resource,
)
from barlow.launch.manifest import LABEL_HASH, MANAGED_BY, RenderError
from barlow.launch.render import render
from barlow.spec import EvalRunSpec, PretrainSpec


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
        created = call(api, ns, objects.create_namespaced_custom_object, *res.args(ns), body, res=res, name=name,
                       dry_run="All" if dry_run else None, field_validation="Strict",  # an unknown field: refused
                        _request_timeout=REQUEST_TIMEOUT_S)
    except AlreadyExists:
        return same(read(api, res, name, ns) or {"metadata": {}})
    outcome = "valid (server dry run; nothing created)" if dry_run else "created"
    return Submitted(res.what, name, ns, outcome, (created.get("metadata") or {}).get("uid"))


def _submit_object(api: client.ApiClient, res: Resource, body: dict[str, Any], dry_run: bool) -> Submitted:
    """Create `body` unless an object of that name exists: same spec hash → already submitted, other → error."""
    existing = read(api, res, body["metadata"]["name"], body["metadata"]["namespace"])
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
    call(api, ns, objects.patch_namespaced_custom_object, *NETWORK_POLICIES.args(ns), name, patch,
         res=NETWORK_POLICIES, name=name, _request_timeout=REQUEST_TIMEOUT_S)


def _delete_policy(api: client.ApiClient, policy: dict[str, Any]) -> None:
    name, ns = policy["metadata"]["name"], policy["metadata"]["namespace"]
    objects = client.CustomObjectsApi(api)
    try:
        call(api, ns, objects.delete_namespaced_custom_object, *NETWORK_POLICIES.args(ns), name,
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
    existing = read(api, res, job["metadata"]["name"], job["metadata"]["namespace"])
    done = _same_or_conflict(res, existing, job) if existing is not None else None
    found = read(api, NETWORK_POLICIES, policy["metadata"]["name"], policy["metadata"]["namespace"])
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


def status_of(obj: dict[str, Any], b: Backend) -> JobStatus:
    """The status of a job object as the API server returned it."""
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
    obj = read(api, resource(b), name, namespace)
    if obj is None:
        raise ClusterError(f"no {b.what} {name} in namespace '{namespace}' (see `barlow list -n {namespace}`)")
    return status_of(obj, b)


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
    pods = call(api, namespace, core.list_namespaced_pod, namespace, label_selector=selector,
                _request_timeout=REQUEST_TIMEOUT_S).items
    if not pods:
        phase = status(api, name, namespace, b).phase  # raises the clearer error when the job itself is missing
        raise ClusterError(f"no pod yet for replica {replica} of {b.what} {name} (phase {phase})")
    pod = max(pods, key=lambda p: p.metadata.creation_timestamp or 0)  # the latest attempt after restarts
    resp = call(api, namespace, core.read_namespaced_pod_log, pod.metadata.name, namespace, container=b.container,
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
    call(api, namespace, objects.delete_namespaced_custom_object, *res.args(namespace), name, res=res, name=name,
         propagation_policy="Background", _request_timeout=REQUEST_TIMEOUT_S)


def list_jobs(api: client.ApiClient, namespace: str, b: Backend) -> list[JobStatus]:
    """barlow's jobs of one backend in the namespace, oldest first."""
    selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
    res, objects = resource(b), client.CustomObjectsApi(api)
    found = call(api, namespace, objects.list_namespaced_custom_object, *res.args(namespace), res=res,
                 label_selector=selector, _request_timeout=REQUEST_TIMEOUT_S)
    return sorted((status_of(o, b) for o in found.get("items") or []), key=lambda s: (s.created, s.name))
