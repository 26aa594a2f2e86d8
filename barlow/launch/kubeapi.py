"""The Kubernetes API client barlow's commands share: connecting (the kubeconfig, or inside a pod the in-cluster
service account), the namespace every command acts in, and every API call, whose failures a user can act on become
one `ClusterError` line here (no cluster configured, a missing namespace, the job's CRD not installed, forbidden,
another job under the same name). The verbs on jobs are launch/cluster.py's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from barlow.launch.backend import Backend
from barlow.spec import ClusterSpec, RunSpec, SpecError, with_fields

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
        found = call(api, "", objects.get_api_resources, res.group, res.version, _request_timeout=REQUEST_TIMEOUT_S)
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


def call(api: client.ApiClient, namespace: str, fn: Callable[..., Any], *args: Any, res: Resource | None = None,
         name: str = "", **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, an API call on `res` (object `name`) in `namespace`; failures raise ClusterError."""
    try:
        return fn(*args, **kwargs)
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
        raise _translate(api, e, namespace, res, name) from None


def read(api: client.ApiClient, res: Resource, name: str, namespace: str) -> dict[str, Any] | None:
    """The object, or None where there is none (raises ClusterError where the namespace or the CRD is missing)."""
    objects = client.CustomObjectsApi(api)
    try:
        return call(api, namespace, objects.get_namespaced_custom_object, *res.args(namespace), name, res=res, name=name,
                    _request_timeout=REQUEST_TIMEOUT_S)
    except NotFound:
        return None


def spec_namespace(spec: RunSpec, option: str | None, context: str | None = None) -> RunSpec:
    """The spec placed in the namespace `resolve_namespace` picks, so the manifest and the pod's spec agree."""
    namespace = resolve_namespace(option, spec, context)
    if namespace == spec.cluster.namespace:
        return spec
    return with_fields(spec, {"cluster.namespace": namespace}, "--namespace")
