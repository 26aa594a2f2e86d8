"""`barlow render|submit|status|logs|wait|delete|list`: a spec as a Kubeflow PyTorchJob or TrainJob on Kubernetes."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum

import typer

from barlow.cli.common import EXIT_INVALID, app, console, fail, invalid, load_or_exit
from barlow.errors import EXIT_UNREACHABLE
from barlow.launch.backend import NAMES
from barlow.spec import SPEC_ENV, STAGE_HELP, ClusterSpec, EvalRunSpec, PretrainSpec, SpecError, Stage, loads_spec, stage_runs

DEFAULT_NAMESPACE = ClusterSpec.model_fields["namespace"].default
DEFAULT_BACKEND = ClusterSpec.model_fields["backend"].default


Target = Stage  # the stages, and their rules, are the spec's (spec.stage_runs), the same for run, render and submit
TARGET_HELP = STAGE_HELP
SPEC_HELP = "Path to a run spec (YAML)."
CONTEXT = typer.Option(None, "--context", help="kubeconfig context (default: its current context).")
NAMESPACE = typer.Option(DEFAULT_NAMESPACE, "--namespace", "-n", envvar="BARLOW_NAMESPACE", help="Namespace of the job.")
BackendName = StrEnum("BackendName", {name: name for name in NAMES})
BACKEND = typer.Option(DEFAULT_BACKEND, "--backend", "-b", envvar="BARLOW_BACKEND",
                       help="pytorchjob (Kubeflow training operator v1) or trainjob (Kubeflow Trainer v2).")


@contextmanager
def _cluster_errors() -> Iterator[None]:
    from barlow.launch.cluster import ClusterError, ClusterUnreachable
    from barlow.launch.manifest import RenderError

    try:
        yield
    except RenderError as e:
        raise fail(str(e), EXIT_INVALID) from None
    except ClusterUnreachable as e:
        raise fail(str(e), EXIT_UNREACHABLE) from None
    except ClusterError as e:
        raise fail(str(e)) from None
    except SpecError as e:
        raise invalid(e.problems, f"{e.source}: " if e.source else "") from None


def _spec(spec_path: str | None, target: Target, namespace: str | None) -> PretrainSpec | EvalRunSpec:
    """The spec from its file (or from $BARLOW_SPEC), checked against the target, placed in --namespace."""
    if spec_path:
        spec = load_or_exit(spec_path)
    elif SPEC_ENV in os.environ:
        try:
            spec = loads_spec(os.environ[SPEC_ENV], SPEC_ENV)
        except SpecError as e:
            raise fail(f"{SPEC_ENV}: " + "; ".join(e.problems), EXIT_INVALID) from None
    else:
        raise fail(f"give a spec file (or the spec's YAML in ${SPEC_ENV})", EXIT_INVALID)
    source = spec_path or SPEC_ENV
    from barlow.launch.cluster import spec_namespace

    with _cluster_errors():
        stage_runs(spec, target, source)  # the stage fits the spec's kind, and a pipeline's eval is valid
        return spec_namespace(spec, namespace)


@app.command()
def render(
    target: Target = typer.Argument(..., help=TARGET_HELP),
    spec_path: str = typer.Argument(..., metavar="SPEC", help=SPEC_HELP),
    namespace: str = typer.Option(None, "--namespace", "-n", help="Namespace (default: the spec's cluster.namespace)."),
) -> None:
    """Print the Kubernetes manifests of a spec (YAML) for `kubectl apply -f -`."""
    from barlow.launch.kubernetes import render as render_docs
    from barlow.launch.kubernetes import to_yaml

    spec = _spec(spec_path, target, namespace)
    with _cluster_errors():
        typer.echo(to_yaml(render_docs(spec, target.value)), nl=False)


@app.command()
def submit(
    target: Target = typer.Argument(..., help=TARGET_HELP),
    spec_path: str = typer.Argument(None, metavar="[SPEC]", help=f"Path to a run spec (YAML); omitted: the YAML in ${SPEC_ENV}."),
    context: str = CONTEXT,
    namespace: str = typer.Option(None, "--namespace", "-n", help="Namespace (default: the spec's cluster.namespace)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Have the API server validate the objects without creating them."),
    after: str = typer.Option(None, "--after", metavar="JOB",
                              help="Wait for this job (of the spec's backend) to succeed first (what the pipeline's "
                                   "follow-up runs)."),
    poll: float = typer.Option(30.0, "--poll", min=0.01, help="Seconds between status checks with --after."),
) -> None:
    """Create the job(s) of a spec (a PyTorchJob or a TrainJob: cluster.backend); submitting the same spec again
    changes nothing."""
    from barlow.launch import cluster

    spec = _spec(spec_path, target, namespace)
    with _cluster_errors():
        api = cluster.connect(context)
        if after:
            if target != Target.eval:
                raise fail("--after goes with `submit eval`", EXIT_INVALID)
            (ev,) = stage_runs(spec, Target.eval)
            done = cluster.submit_after(api, ev, after, poll=poll, on_change=_print_phase)
        else:
            done = cluster.submit(api, spec, target.value, dry_run=dry_run)
    for s in done:
        console.print(f"{s.what} [bold]{s.name}[/] in namespace {s.namespace}: {s.outcome}", highlight=False, soft_wrap=True)
    if not dry_run:
        first, flag = done[0], "" if spec.cluster.backend == DEFAULT_BACKEND else f" -b {spec.cluster.backend}"
        console.print(f"watch it: barlow status {first.name} -n {first.namespace}{flag}   "
                      f"(or kubectl -n {first.namespace} get {first.what} {first.name})", highlight=False, soft_wrap=True)


def _print_phase(st) -> None:
    console.print(f"{st.what} {st.name}: {st.phase}{' - ' + st.message if st.message else ''}", highlight=False, soft_wrap=True)


def _backend(name: BackendName):
    from barlow.launch import backend

    return backend.get(name.value)


@app.command()
def status(name: str = typer.Argument(..., help="Job name (the run name)."), namespace: str = NAMESPACE,
           context: str = CONTEXT, backend: BackendName = BACKEND) -> None:
    """Show a job's phase (Queued while Kueue holds it), replicas and times."""
    from barlow.launch import cluster

    with _cluster_errors():
        st = cluster.status(cluster.connect(context), name, namespace, _backend(backend))
    replicas = "; ".join(f"{k} " + ", ".join(f"{s} {n}" for s, n in v.items()) for k, v in st.replicas.items())
    for key, value in [("name", st.name), ("namespace", st.namespace), ("kind", st.kind), ("phase", st.phase),
                       ("message", st.message), ("replicas", replicas), ("created", st.created), ("started", st.started),
                       ("finished", st.finished), ("spec hash", st.spec_hash)]:
        if value:
            console.print(f"{key + ':':<11}{value}", highlight=False, soft_wrap=True)


@app.command()
def logs(
    name: str = typer.Argument(..., help="Job name (the run name)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming new lines."),
    replica: str = typer.Option("master", "--replica",
                                help="master; worker-N for a PyTorchJob (node rank N + 1), node-N for a TrainJob."),
    namespace: str = NAMESPACE,
    context: str = CONTEXT,
    backend: BackendName = BACKEND,
) -> None:
    """Print the training container's log of one replica."""
    from barlow.launch import cluster

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with _cluster_errors():
        cluster.logs(cluster.connect(context), name, namespace, replica=replica, follow=follow, write=write,
                     b=_backend(backend))


@app.command()
def wait(
    name: str = typer.Argument(..., help="Job name (the run name)."),
    timeout: float = typer.Option(None, "--timeout", min=0, help="Give up after this many seconds (default: never)."),
    poll: float = typer.Option(10.0, "--poll", min=0.01, help="Seconds between status checks."),
    namespace: str = NAMESPACE,
    context: str = CONTEXT,
    backend: BackendName = BACKEND,
) -> None:
    """Wait until a job succeeds (exit 0) or fails (exit 1), printing each phase change; a queued job is waited for."""
    from barlow.launch import cluster

    b = _backend(backend)
    with _cluster_errors():
        st = cluster.wait(cluster.connect(context), name, namespace, timeout=timeout, poll=poll, on_change=_print_phase, b=b)
    if not st.finished_ok:
        raise fail(f"{b.what} {name} failed: {st.message or 'no message'}")


@app.command()
def delete(name: str = typer.Argument(..., help="Job name (the run name)."), namespace: str = NAMESPACE,
           context: str = CONTEXT, backend: BackendName = BACKEND) -> None:
    """Delete a job with its pods (its output in output.url stays)."""
    from barlow.launch import cluster

    b = _backend(backend)
    with _cluster_errors():
        cluster.delete(cluster.connect(context), name, namespace, b)
    console.print(f"{b.what} {name} in namespace {namespace}: deleted", highlight=False, soft_wrap=True)


@app.command("list")
def list_jobs(namespace: str = NAMESPACE, context: str = CONTEXT, backend: BackendName = BACKEND) -> None:
    """List barlow's jobs of one backend in a namespace."""
    from rich.table import Table

    from barlow.launch import cluster

    b = _backend(backend)
    with _cluster_errors():
        jobs = cluster.list_jobs(cluster.connect(context), namespace, b)
    if not jobs:
        console.print(f"no barlow {b.plural} in namespace {namespace}", highlight=False, soft_wrap=True)
        return
    table = Table("NAME", "KIND", "PHASE", "CREATED", "SPEC HASH", box=None, highlight=False)
    for st in jobs:
        table.add_row(st.name, st.kind, st.phase, st.created, st.spec_hash)
    console.print(table)


@app.command()
def plan(
    spec_path: str = typer.Argument(..., metavar="SPEC", help=SPEC_HELP),
    images: int = typer.Option(None, "--images", min=1, help="Training images (default: counted from a shard index)."),
    gpu: str = typer.Option(None, "--gpu", help="GPU model, as the node label nvidia.com/gpu.product (default: the "
                                                "spec's cluster.node_selector)."),
) -> None:
    """Print what a run will do before it is submitted: GPUs, global batch, steps, expected wall time and GPU-hours."""
    from barlow.launch.plan import images_in, lines, make_plan

    spec = load_or_exit(spec_path)
    if images is None:
        try:
            images = images_in(spec)
        except (OSError, ValueError, KeyError) as e:
            raise fail(f"data.train: cannot count the images in the shard index ({type(e).__name__}: {e}); "
                       "pass --images N") from None
    for label, value in lines(spec, make_plan(spec, images, gpu)):
        console.print(f"{label + ':':<14}{value}", highlight=False, soft_wrap=True)
