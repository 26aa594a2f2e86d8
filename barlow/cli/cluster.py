"""`barlow render|submit|status|logs|wait|delete|list`: a spec as a Kubeflow PyTorchJob or TrainJob on Kubernetes."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum

import typer

from barlow.cli.common import EXIT_INVALID, JOB, SET, SPEC, app, console, err_console, example, fail, invalid, load_or_exit
from barlow.errors import EXIT_UNREACHABLE, EXIT_WAIT_TIMEOUT
from barlow.spec import (
    BACKENDS,
    SPEC_ENV,
    STAGE_HELP,
    ClusterSpec,
    EvalRunSpec,
    PretrainSpec,
    SpecError,
    Stage,
    loads_spec,
    stage_runs,
)

DEFAULT_NAMESPACE = ClusterSpec.model_fields["namespace"].default
DEFAULT_BACKEND = ClusterSpec.model_fields["backend"].default


STAGE = typer.Argument(..., metavar="STAGE", help=STAGE_HELP)  # the spec's stages and rules (spec.stage_runs), as for run
CONTEXT = typer.Option(None, "--context", help="kubeconfig context (default: its current context).")
NAMESPACE = typer.Option(None, "--namespace", "-n", show_default=False,
                         help="Namespace of the job (default: $BARLOW_NAMESPACE, else the kubeconfig context's, else "
                              f"{DEFAULT_NAMESPACE}).")
SPEC_NAMESPACE = typer.Option(None, "--namespace", "-n", show_default=False,
                              help="Namespace of the job (default: $BARLOW_NAMESPACE, else the spec's cluster.namespace "
                                   f"where it is set, else the kubeconfig context's, else {DEFAULT_NAMESPACE}).")
BackendName = StrEnum("BackendName", {name: name for name in BACKENDS})
BACKEND = typer.Option(DEFAULT_BACKEND, "--backend", "-b", envvar="BARLOW_BACKEND",
                       help="pytorchjob (Kubeflow training operator v1) or trainjob (Kubeflow Trainer v2).")


@contextmanager
def _cluster_errors(hint: str = "") -> Iterator[None]:
    """Cluster errors as one `error:` line (`hint` appended to the cluster's own)."""
    from barlow.launch.kubeapi import ClusterError, ClusterUnreachable, WaitTimedOut
    from barlow.launch.manifest import RenderError

    try:
        with _cluster_warnings():
            yield
    except WaitTimedOut as e:
        raise fail(str(e), EXIT_WAIT_TIMEOUT) from None
    except RenderError as e:
        raise fail(str(e), EXIT_INVALID) from None
    except ClusterUnreachable as e:
        raise fail(f"{e}{hint}", EXIT_UNREACHABLE) from None
    except ClusterError as e:
        raise fail(f"{e}{hint}") from None
    except SpecError as e:
        raise invalid(e.problems, f"{e.source}: " if e.source else "") from None


@contextmanager
def _cluster_warnings() -> Iterator[None]:
    """Print each distinct ClusterWarning as one `warning:` line on stderr (stdout stays the manifests)."""
    from barlow.launch.checks import ClusterWarning

    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ClusterWarning)
            yield
    finally:  # shown after the block: shown inside it, a warning would be recorded again, and looped over forever
        for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, ClusterWarning)):
            err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
        foreign = {(str(w.message), w.category): w for w in caught if not issubclass(w.category, ClusterWarning)}
        for w in foreign.values():  # once each, e.g. urllib3's InsecureRequestWarning, raised on every request
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _spec(spec_path: str | None, target: Stage, namespace: str | None, overrides: list[str] | None,
          context: str | None = None) -> PretrainSpec | EvalRunSpec:
    """The spec from its file (or from $BARLOW_SPEC) with its --set overrides, checked against the target, placed in
    its namespace (see launch.kubeapi.resolve_namespace)."""
    if spec_path:
        spec = load_or_exit(spec_path, overrides)
    elif SPEC_ENV in os.environ:
        try:
            spec = loads_spec(os.environ[SPEC_ENV], SPEC_ENV, overrides or ())
        except SpecError as e:
            named = [p if p.startswith(SPEC_ENV) else f"{SPEC_ENV}: {p}" for p in e.problems]  # YAML errors name it already
            raise fail("; ".join(named), EXIT_INVALID) from None
    else:
        raise fail(f"give a spec file (or the spec's YAML in ${SPEC_ENV})", EXIT_INVALID)
    source = spec_path or SPEC_ENV
    from barlow.launch.kubeapi import spec_namespace

    with _cluster_errors():
        stage_runs(spec, target, source)  # the stage fits the spec's kind, and a pipeline's eval is valid
        return spec_namespace(spec, namespace, context)


@app.command(epilog=example("barlow render pipeline spec.yaml --set cluster.image=registry.example.com/barlow:0.1.0 "
                            "| kubectl apply -f -"))
def render(
    target: Stage = STAGE,
    spec_path: str = SPEC,
    namespace: str = SPEC_NAMESPACE,
    context: str = typer.Option(None, "--context", help="kubeconfig context whose namespace applies (default: its "
                                                        "current context)."),
    overrides: list[str] = SET,
) -> None:
    """Print the Kubernetes manifests of a spec (YAML) for `kubectl apply -f -`."""
    from barlow.launch.render import render as render_docs
    from barlow.launch.render import to_yaml

    spec = _spec(spec_path, target, namespace, overrides, context)
    with _cluster_errors():
        typer.echo(to_yaml(render_docs(spec, target.value)), nl=False)


@app.command(epilog=example("barlow submit pipeline spec.yaml --set optim.epochs=300"))
def submit(
    target: Stage = STAGE,
    spec_path: str = typer.Argument(None, metavar="SPEC", help=f"Path to a run spec (YAML); omitted: the YAML in ${SPEC_ENV}."),
    context: str = CONTEXT,
    namespace: str = SPEC_NAMESPACE,
    dry_run: bool = typer.Option(False, "--dry-run", help="Have the API server validate the objects without creating them."),
    after: str = typer.Option(None, "--after", metavar="JOB",
                              help="Wait for this job (of the spec's backend) to succeed first (what the pipeline's "
                                   "follow-up runs)."),
    poll: float = typer.Option(30.0, "--poll", min=0.01, help="Seconds between status checks with --after."),
    overrides: list[str] = SET,
) -> None:
    """Create the job(s) of a spec (a PyTorchJob or a TrainJob: cluster.backend); submitting the same spec again
    changes nothing."""
    from barlow.launch import cluster, kubeapi

    spec = _spec(spec_path, target, namespace, overrides, context)
    with _cluster_errors():
        api = kubeapi.connect(context)
        if after:
            if target != Stage.eval:
                raise fail("--after goes with `submit eval`", EXIT_INVALID)
            (ev,) = stage_runs(spec, Stage.eval)
            done = cluster.submit_after(api, ev, after, poll=poll, on_change=_print_phase)
        else:
            done = cluster.submit(api, spec, target.value, dry_run=dry_run)
    for s in done:
        console.print(f"{s.what} [bold]{s.name}[/] in namespace {s.namespace}: {s.outcome}", highlight=False, soft_wrap=True)
    if not dry_run:
        first = next(s for s in done if s.what != kubeapi.NETWORK_POLICIES.what)  # the job, after its policy
        flag = "" if spec.cluster.backend == DEFAULT_BACKEND else f" -b {spec.cluster.backend}"
        console.print(f"watch it: barlow status {first.name} -n {first.namespace}{flag}   "
                      f"(or kubectl -n {first.namespace} get {first.what} {first.name})", highlight=False, soft_wrap=True)


def _print_phase(st) -> None:
    console.print(f"{st.what} {st.name}: {st.phase}{' - ' + st.message if st.message else ''}", highlight=False, soft_wrap=True)


def _namespace(option: str | None, context: str | None) -> str:
    """The namespace of a command that names a job (see launch.kubeapi.resolve_namespace)."""
    from barlow.launch.kubeapi import resolve_namespace

    with _cluster_errors():
        return resolve_namespace(option, None, context)


def _backend(name: BackendName):
    from barlow.launch import backend, render  # noqa: F401  importing render registers the built-in backends

    return backend.get(name.value)


OutputFormat = StrEnum("OutputFormat", {"text": "text", "json": "json"})


@app.command(epilog=example("barlow status runs/quickstart", "barlow status my-run -n vision -b trainjob",
                            "barlow status -f spec.yaml --watch", "barlow status my-run -o json"))
def status(
    target: str = typer.Argument(None, metavar="TARGET",
                                 help="A job name, or a run's output folder or URL: anything with a '/' (runs/quickstart, "
                                      "./out, s3://bucket/runs/x) is read as the run's files. Default: the -f spec's name."),
    spec_path: str = typer.Option(None, "--file", "-f", metavar="SPEC",
                                  help="The run's spec: the job's name, namespace and backend, and its output.url, whose "
                                       "files give the progress."),
    overrides: list[str] = SET,
    namespace: str = SPEC_NAMESPACE,
    context: str = CONTEXT,
    backend: BackendName = typer.Option(None, "--backend", "-b", envvar="BARLOW_BACKEND", show_default=False,
                                        help=f"{' or '.join(BACKENDS)} (default: the -f spec's, else {DEFAULT_BACKEND})."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh every --interval seconds until Ctrl-C."),
    interval: float = typer.Option(10.0, "--interval", min=0.0, help="Seconds between refreshes with --watch."),
    count: int = typer.Option(None, "--count", min=1, help="With --watch: stop after this many refreshes."),
    output: OutputFormat = typer.Option(OutputFormat.text, "--output", "-o",
                                        help="text, or json for scripts (with --watch: one JSON object per line)."),
    endpoint_url: str = typer.Option(None, "--endpoint-url", help="S3 endpoint of an s3:// output (default: the -f spec's "
                                                                  "data.s3.endpoint_url, else AWS)."),
) -> None:
    """How far, how fast, is it healthy: a job's phase, why its pods are not running, Kueue's admission; and from the
    run's files (an output folder or URL, or -f SPEC), step of total, loss, probe top-1, images/s, ETA, the latest
    checkpoint and the restarts used."""
    spec = load_or_exit(spec_path, overrides) if spec_path else None
    from barlow.status.report import folder_hint

    is_output = target is not None and "/" in target  # a Kubernetes name never holds a '/'
    if target is None and spec is None:
        raise fail("give a job name, an output folder or URL, or -f SPEC", EXIT_INVALID)
    if is_output and spec is not None:
        raise fail("give an output folder or -f SPEC, not both (the spec's output.url is the run's folder)", EXIT_INVALID)
    name = target or spec.name
    job_args = None
    local_run = spec is not None and "cluster" not in spec.model_fields_set  # a spec without a cluster runs here
    hint = folder_hint(target) if not is_output and spec is None else ""
    if not is_output and not local_run:
        from barlow.launch.kubeapi import resolve_namespace

        with _cluster_errors(hint):
            ns = resolve_namespace(namespace, spec, context)
        job_args = (name, ns, _backend(backend or BackendName(spec.cluster.backend if spec else DEFAULT_BACKEND)))

    def job():
        from barlow.launch import kubeapi, pods

        with _cluster_errors(hint):
            return pods.view(kubeapi.connect(context), *job_args)

    url = target if is_output else (spec.output.url if spec else "")

    def screen(indent: int | None = None) -> str:
        from barlow.status.report import FilesUnreadable, gather, read_output

        try:
            found = gather(job if job_args is not None else None, url,
                           lambda u, now: read_output(u, spec, now, endpoint_url))
        except FilesUnreadable as e:
            raise fail(str(e), e.code) from None
        return found.screen(output == OutputFormat.json, indent)

    if not watch:
        typer.echo(screen(indent=2))
        return
    from barlow.status.report import refresh

    refresh(screen, typer.echo, console, console.is_terminal and output == OutputFormat.text, interval, count,
            blips=(typer.Exit,), between="" if output == OutputFormat.json else "\n")


@app.command(epilog=example("barlow logs my-run -f --replica worker-0"))
def logs(
    name: str = JOB,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming new lines."),
    replica: str = typer.Option("master", "--replica",
                                help="master; worker-N for a PyTorchJob (node rank N + 1), node-N for a TrainJob."),
    namespace: str = NAMESPACE,
    context: str = CONTEXT,
    backend: BackendName = BACKEND,
) -> None:
    """Print the training container's log of one replica."""
    from barlow.launch import cluster, kubeapi

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    namespace = _namespace(namespace, context)
    with _cluster_errors():
        cluster.logs(kubeapi.connect(context), name, namespace, replica=replica, follow=follow, write=write,
                     b=_backend(backend))


@app.command(epilog=example("barlow wait my-run --timeout 3600"))
def wait(
    name: str = JOB,
    timeout: float = typer.Option(None, "--timeout", min=0, help="Give up after this many seconds (default: never)."),
    poll: float = typer.Option(10.0, "--poll", min=0.01, help="Seconds between status checks."),
    namespace: str = NAMESPACE,
    context: str = CONTEXT,
    backend: BackendName = BACKEND,
) -> None:
    """Wait until a job succeeds (exit 0) or fails (exit 1), printing each phase change; a queued job is waited for;
    exit 124 when --timeout runs out first."""
    from barlow.launch import cluster, kubeapi

    b, namespace = _backend(backend), _namespace(namespace, context)
    with _cluster_errors():
        st = cluster.wait(kubeapi.connect(context), name, namespace, timeout=timeout, poll=poll, on_change=_print_phase, b=b)
    if not st.finished_ok:
        raise fail(f"{b.what} {name} failed: {st.message or 'no message'}")


@app.command(epilog=example("barlow delete my-run -n vision"))
def delete(name: str = JOB, namespace: str = NAMESPACE,
           context: str = CONTEXT, backend: BackendName = BACKEND) -> None:
    """Delete a job; Kubernetes' garbage collector removes what the job owns: its pods, its NetworkPolicy, a
    pipeline's follow-up (its output in output.url stays)."""
    from barlow.launch import cluster, kubeapi

    b, namespace = _backend(backend), _namespace(namespace, context)
    with _cluster_errors():
        cluster.delete(kubeapi.connect(context), name, namespace, b)
    console.print(f"{b.what} {name} in namespace {namespace}: deleted", highlight=False, soft_wrap=True)


@app.command("list", epilog=example("barlow list -n vision -b trainjob"))
def list_jobs(namespace: str = NAMESPACE, context: str = CONTEXT, backend: BackendName = BACKEND) -> None:
    """List barlow's jobs of one backend in a namespace."""
    from rich.table import Table

    from barlow.launch import cluster, kubeapi

    b, namespace = _backend(backend), _namespace(namespace, context)
    with _cluster_errors():
        jobs = cluster.list_jobs(kubeapi.connect(context), namespace, b)
    if not jobs:
        console.print(f"no barlow {b.plural} in namespace {namespace}", highlight=False, soft_wrap=True)
        return
    table = Table("NAME", "KIND", "PHASE", "CREATED", "SPEC HASH", box=None, highlight=False)
    for st in jobs:
        table.add_row(st.name, st.kind, st.phase, st.created, st.spec_hash)
    console.print(table)


@app.command(epilog=example("barlow plan spec.yaml --gpu NVIDIA-H100-80GB-HBM3 --set optim.epochs=300"))
def plan(
    spec_path: str = SPEC,
    overrides: list[str] = SET,
    images: int = typer.Option(None, "--images", min=1, help="Training images (default: counted from a shard index)."),
    gpu: str = typer.Option(None, "--gpu", help="GPU model, as the node label nvidia.com/gpu.product (default: the "
                                                "spec's cluster.node_selector)."),
) -> None:
    """Print what a run will do before it is submitted, stage by stage (a pretrain spec: pretraining, then its
    pipeline's eval): GPUs, global batch, steps, expected wall time and GPU-hours. What it cannot know it says is
    unknown, and why (an image folder, no S3 credentials, no measured throughput)."""
    from barlow.launch.plan import report

    spec = load_or_exit(spec_path, overrides)
    for line in report(spec, images, gpu):
        console.print(line, highlight=False, soft_wrap=True)
