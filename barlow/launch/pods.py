"""Why a job's pods are not running, and what Kueue says while it holds the job: what `barlow status` reads from the
cluster besides the job's own status.

A pod's reason comes from where Kubernetes puts it: a container's waiting state (ImagePullBackOff, ErrImagePull,
CrashLoopBackOff with the exit of the run before), its terminated state (OOMKilled and the exit code), the pod's
PodScheduled condition (the scheduler's `0/4 nodes are available: 4 Insufficient nvidia.com/gpu`), the pod's own
reason (Evicted), and else its latest Warning event. Kueue's word is the condition of the job's Workload, found by
the `kueue.x-k8s.io/job-uid` label Kueue puts on it. Events and Workloads are extras: where they cannot be read
(RBAC, Kueue not installed) the status goes on without them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kubernetes import client

from barlow.launch import cluster, kubeapi
from barlow.launch.backend import QUEUED, Backend
from barlow.launch.manifest import ANNOTATION_OUTPUT, KUEUE_QUEUE

KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_VERSIONS = ("v1beta2", "v1beta1")  # newest first: Kueue serves v1beta2 from 0.15 on, v1beta1 before
KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"  # the label that ties a Workload to its job
STARTING = ("ContainerCreating", "PodInitializing")  # waiting reasons of a pod on its way up: no problem


@dataclass(frozen=True)
class PodState:
    """One pod of the job and, where it is not running as it should, why."""

    name: str
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    ready: bool
    restarts: int  # container restarts in this pod
    reason: str = ""  # Unschedulable, ImagePullBackOff, ErrImagePull, CrashLoopBackOff, OOMKilled, Error, Evicted, ...
    message: str = ""
    exit_code: int | None = None  # of the training container's last termination, where it has one


@dataclass
class JobView:
    """The job as `barlow status` shows it: its status, its pods, Kueue's admission, where it writes."""

    status: cluster.JobStatus
    output: str = ""  # output.url, from the job's annotation
    queue: str = ""  # the Kueue LocalQueue it was submitted to ("" without Kueue)
    admission: str = ""  # Kueue's message about the job's Workload while it holds the job ("" otherwise)
    pods: list[PodState] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        st = self.status
        job = {k: getattr(st, k) for k in ("name", "namespace", "kind", "phase", "message", "replicas", "created",
                                           "started", "finished", "spec_hash", "trainer_status")}
        return {"job": {**job, "backend": st.what, "output": self.output, "queue": self.queue},
                "admission": self.admission, "pods": [asdict(p) for p in self.pods]}

    def rows(self) -> list[tuple[str, str]]:
        return lines(self)


def lines(view: JobView) -> list[tuple[str, str]]:
    """(label, value) rows that `barlow status` prints for a job: its status, Kueue's admission, one row a pod."""
    st = view.status
    replicas = "; ".join(f"{k} " + ", ".join(f"{s} {n}" for s, n in v.items()) for k, v in st.replicas.items())
    rows = [(k, v) for k, v in [("name", st.name), ("namespace", st.namespace), ("kind", st.kind), ("phase", st.phase),
                                ("message", st.message), ("admission", view.admission), ("replicas", replicas),
                                ("created", st.created), ("started", st.started), ("finished", st.finished),
                                ("spec hash", st.spec_hash)] if v]
    if st.trainer_status:
        rows.append(("trainer", trainer_line(st.trainer_status)))
    for pod in view.pods:
        state = pod.phase + (", not ready" if pod.phase == "Running" and not pod.ready else "")
        state += f", {pod.restarts} restarts" if pod.restarts else ""
        why = f"{pod.reason}: {pod.message}" if pod.reason and pod.message else pod.reason or pod.message
        if pod.exit_code is not None and f"exit code {pod.exit_code}" not in why:
            why += f" (exit code {pod.exit_code})"
        rows.append(("pod", f"{pod.name} {state}" + (f" - {why}" if why else "")))
    return rows


def trainer_line(status: dict[str, Any]) -> str:
    """What the run last reported to Kubeflow Trainer's status server: `42 %, 1234 s left; loss 812.4, ... (at T)`."""
    head = [f"{status['progressPercentage']} %" if "progressPercentage" in status else "",
            f"{status['estimatedRemainingSeconds']} s left" if "estimatedRemainingSeconds" in status else ""]
    metrics = ", ".join(f"{m.get('name')} {m.get('value')}" for m in status.get("metrics") or [])
    text = "; ".join(p for p in (", ".join(h for h in head if h), metrics) if p)
    return text + (f" (at {status['lastUpdatedTime']})" if status.get("lastUpdatedTime") else "")


def job_selector(b: Backend, name: str) -> str:
    """The label selector of every pod of job `name`: the terms of its master's selector that name the job (the
    others pick one replica)."""
    terms = b.pod_selector(name, "master").split(",")
    return ",".join(t for t in terms if t.partition("=")[2] == name)


def view(api: client.ApiClient, name: str, namespace: str, b: Backend) -> JobView:
    """The job, its pods and Kueue's admission; raises ClusterError where the job cannot be read."""
    obj = kubeapi.read(api, kubeapi.resource(b), name, namespace)
    if obj is None:
        return JobView(cluster.status(api, name, namespace, b))  # raises the error that names the missing job
    st = cluster.status_of(obj, b)
    meta = obj.get("metadata") or {}
    found = JobView(st, (meta.get("annotations") or {}).get(ANNOTATION_OUTPUT, ""),
                    (meta.get("labels") or {}).get(KUEUE_QUEUE, ""))
    if found.queue and st.phase == QUEUED:
        found.admission = admission(api, namespace, meta.get("uid", ""), found.queue)
    found.pods = pods(api, name, namespace, b)
    return found


def pods(api: client.ApiClient, name: str, namespace: str, b: Backend) -> list[PodState]:
    """Every pod of the job, by name, each with its reason where it is not running well."""
    core = client.CoreV1Api(api)
    found = kubeapi.call(api, namespace, core.list_namespaced_pod, namespace, label_selector=job_selector(b, name),
                         _request_timeout=kubeapi.REQUEST_TIMEOUT_S).items
    return sorted((explain(p, lambda pod: _events(api, namespace, pod), b.container) for p in found),
                  key=lambda s: s.name)


def _events(api: client.ApiClient, namespace: str, pod: str) -> list[Any]:
    """The pod's events, newest last; none where they cannot be read."""
    core = client.CoreV1Api(api)
    try:
        found = kubeapi.call(api, namespace, core.list_namespaced_event, namespace,
                             field_selector=f"involvedObject.name={pod}", _request_timeout=kubeapi.REQUEST_TIMEOUT_S)
    except kubeapi.ClusterError:
        return []
    return sorted(found.items or [], key=lambda e: str(e.last_timestamp or e.event_time or ""))


def _one_line(text: Any) -> str:
    return " ".join(str(text or "").split())


def _terminated(state: Any) -> Any:
    return state.terminated if state is not None and state.terminated is not None else None


def explain(pod: Any, events: Any, container: str) -> PodState:
    """Why `pod` (a V1Pod) is not running well, or no reason where it is; `events(pod name)` is asked only when
    the pod's status says nothing. The training container is looked at first."""
    status = pod.status or client.V1PodStatus()  # a pod just created may have no status yet
    name, phase = pod.metadata.name, status.phase or "Unknown"
    statuses = sorted(status.container_statuses or [], key=lambda c: c.name != container)
    ready = bool(statuses) and all(c.ready for c in statuses)
    restarts = sum(c.restart_count or 0 for c in statuses)
    base = {"name": name, "phase": phase, "ready": ready, "restarts": restarts}
    for c in [*(status.init_container_statuses or []), *statuses]:
        last = _terminated(c.last_state)
        last_exit = f"last exit: {last.reason or 'Error'}, exit code {last.exit_code}" if last else ""
        if c.state is not None and c.state.waiting is not None and c.state.waiting.reason not in STARTING:
            waiting = c.state.waiting
            message = "; ".join(m for m in (_one_line(waiting.message), last_exit) if m)
            return PodState(**base, reason=waiting.reason or "Waiting", message=message,
                            exit_code=last.exit_code if last else None)
        now = _terminated(c.state)
        if now is not None and (now.exit_code or now.reason == "OOMKilled"):
            return PodState(**base, reason=now.reason or "Error", message=_one_line(now.message), exit_code=now.exit_code)
        if last is not None and last.reason == "OOMKilled":  # running again after the kernel killed it
            return PodState(**base, message=f"restarted after {last_exit}", exit_code=last.exit_code)
    if phase == "Pending":
        for cond in status.conditions or []:
            if cond.type == "PodScheduled" and cond.status == "False":
                message = _one_line(cond.message) or _latest_warning(events(name), "FailedScheduling")[1]
                return PodState(**base, reason=cond.reason or "Unschedulable", message=message)
    if status.reason:  # Evicted, NodeLost, DeadlineExceeded, ...
        return PodState(**base, reason=status.reason, message=_one_line(status.message))
    if phase in ("Pending", "Failed", "Unknown"):
        reason, message = _latest_warning(events(name))
        return PodState(**base, reason=reason, message=message)
    return PodState(**base)


def _latest_warning(events: list[Any], reason: str | None = None) -> tuple[str, str]:
    for e in reversed(events):
        if e.type == "Warning" and (reason is None or e.reason == reason):
            return e.reason or "Warning", _one_line(e.message)
    return "", ""


def admission(api: client.ApiClient, namespace: str, job_uid: str, queue: str) -> str:
    """Kueue's word on the job's Workload: admitted, evicted, or why it waits (the QuotaReserved condition)."""
    objects = client.CustomObjectsApi(api)
    workloads, errors = None, []
    for version in KUEUE_VERSIONS:
        try:
            workloads = kubeapi.call(api, namespace, objects.list_namespaced_custom_object, KUEUE_GROUP, version,
                                      namespace, "workloads", label_selector=f"{KUEUE_JOB_UID}={job_uid}",
                                     _request_timeout=kubeapi.REQUEST_TIMEOUT_S).get("items") or []
            break
        except kubeapi.ClusterError as e:
            errors.append(str(e))
    if workloads is None:
        return f"queue {queue}: Kueue's Workloads cannot be read ({errors[-1]})"
    if not workloads:
        return (f"queue {queue}: Kueue has made no Workload for this job (is Kueue installed, with this job kind's "
                "integration enabled?)")
    wl = max(workloads, key=lambda w: (w.get("metadata") or {}).get("creationTimestamp") or "")
    conds = {c.get("type"): c for c in (wl.get("status") or {}).get("conditions") or []}

    def true(kind: str) -> dict[str, Any] | None:
        c = conds.get(kind)
        return c if c is not None and c.get("status") == "True" else None

    if evicted := true("Evicted"):
        return f"queue {queue}: evicted ({evicted.get('reason', '')}): {_one_line(evicted.get('message'))}"
    if true("Admitted"):
        cq = ((wl.get("status") or {}).get("admission") or {}).get("clusterQueue", "")
        return f"queue {queue}: admitted" + (f" by cluster queue {cq}" if cq else "")
    waiting = conds.get("QuotaReserved") or conds.get("Admitted") or {}
    return f"queue {queue}: " + (_one_line(waiting.get("message")) or "waiting for quota")
