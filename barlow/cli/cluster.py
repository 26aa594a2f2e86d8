"""`barlow render|submit|status|logs|wait|delete|list`: a spec as a Kubeflow PyTorchJob or TrainJob on Kubernetes."""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:  # the commands import what they use when they run: `barlow --help` stays fast
    from barlow.launch.pods import JobView
    from barlow.progress import Progress

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
    from barlow.launch.cluster import ClusterError, ClusterUnreachable, WaitTimedOut
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
    its namespace (see launch.cluster.resolve_namespace)."""
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
    from barlow.launch.cluster import spec_namespace

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
    from barlow.launch import cluster

    spec = _spec(spec_path, target, namespace, overrides, context)
    with _cluster_errors():
        api = cluster.connect(context)
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
        first = next(s for s in done if s.what != cluster.NETWORK_POLICIES.what)  # the job, after its policy
        flag = "" if spec.cluster.backend == DEFAULT_BACKEND else f" -b {spec.cluster.backend}"
        console.print(f"watch it: barlow status {first.name} -n {first.namespace}{flag}   "
                      f"(or kubectl -n {first.namespace} get {first.what} {first.name})", highlight=False, soft_wrap=True)


def _print_phase(st) -> None:
    console.print(f"{st.what} {st.name}: {st.phase}{' - ' + st.message if st.message else ''}", highlight=False, soft_wrap=True)


def _namespace(option: str | None, context: str | None) -> str:
    """The namespace of a command that names a job (see launch.cluster.resolve_namespace)."""
    from barlow.launch.cluster import resolve_namespace

    with _cluster_errors():
        return resolve_namespace(option, None, context)


def _backend(name: BackendName):
    from barlow.launch import backend, render  # noqa: F401  importing render registers the built-in backends

    return backend.get(name.value)


OutputFormat = StrEnum("OutputFormat", {"text": "text", "json": "json"})
STATUS_SCHEMA = "barlow.status/v1"  # the `-o json` document's version: fields are only added within it


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
                                        help=f"pytorchjob or trainjob (default: the -f spec's, else {DEFAULT_BACKEND})."),
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
    is_output = target is not None and "/" in target  # a Kubernetes name never holds a '/'
    if target is None and spec is None:
        raise fail("give a job name, an output folder or URL, or -f SPEC", EXIT_INVALID)
    if is_output and spec is not None:
        raise fail("give an output folder or -f SPEC, not both (the spec's output.url is the run's folder)", EXIT_INVALID)
    name = target or spec.name
    job_args = None
    local_run = spec is not None and "cluster" not in spec.model_fields_set  # a spec without a cluster runs here
    hint = _run_folder_hint(target) if not is_output and spec is None else ""
    if not is_output and not local_run:
        from barlow.launch.cluster import resolve_namespace

        with _cluster_errors(hint):
            ns = resolve_namespace(namespace, spec, context)
        job_args = (name, ns, _backend(backend or BackendName(spec.cluster.backend if spec else DEFAULT_BACKEND)))

    def report() -> _Report:
        from barlow.launch import cluster, pods

        found = _Report(time.time())
        if job_args is not None:
            with _cluster_errors(hint):
                found.job = pods.view(cluster.connect(context), *job_args)
        url = target if is_output else (spec.output.url if spec else "")
        if url:
            try:
                found.progress = _read_progress(url, spec, found.time, endpoint_url)
            except ImportError as e:  # the CLI image has no fsspec: a job's status stands without its files
                why = f"reading {url} needs {e.name or 'fsspec'}, which this installation lacks (the training image has it)"
                if job_args is None:
                    raise fail(why) from None
                found.progress_error = why
            except FileNotFoundError as e:
                if job_args is None:
                    raise fail(str(e), EXIT_INVALID) from None
                found.progress_error = str(e)
            except Exception as e:  # the job's status stands without its files (no credentials, a store down)
                if job_args is None:
                    raise fail(f"{url}: {type(e).__name__}: {e}") from None
                found.progress_error = f"{url}: {type(e).__name__}: {e}"
        return found

    _refresh(report, output, watch, interval, count)


def _run_folder_hint(target: str | None) -> str:
    """Where a job name is also a run folder here: how to ask for the folder instead."""
    if target and any(os.path.exists(os.path.join(target, f)) for f in ("run.json", "metrics.jsonl", "checkpoints")):
        return f" ({target} is read as a job name; for the run folder here, write: barlow status ./{target})"
    return ""


def _read_progress(url: str, spec: PretrainSpec | EvalRunSpec | None, now: float, endpoint_url: str | None) -> Progress:
    from barlow import progress, storage

    # the output is read as the run writes it (the spec's S3 endpoint), with one attempt: a store that does not
    # answer is said at once, not after a minute of retries
    settings = spec.data.s3.model_dump() if spec is not None else {}
    storage.configure_s3(storage.S3Settings(**{**settings, "retries": 1,
                                                **({"endpoint_url": endpoint_url} if endpoint_url else {})}))
    return progress.read(url, spec.cluster.max_restarts if spec else None, now)


@dataclass
class _Report:
    """One refresh of `barlow status`."""

    time: float
    job: JobView | None = None
    progress: Progress | None = None
    progress_error: str = ""

    def as_dict(self) -> dict:
        """The `-o json` document (README: `barlow status -o json`)."""
        job = self.job.as_dict() if self.job else {"job": None, "admission": "", "pods": []}
        return {"schema": STATUS_SCHEMA, "time": round(self.time, 3), **job,
                "progress": self.progress.as_dict() if self.progress else None, "progress_error": self.progress_error}

    def lines(self) -> list[str]:
        rows: list[tuple[str, str]] = []
        if self.job is not None:
            from barlow.launch.pods import lines as job_lines

            rows += job_lines(self.job)
            if self.progress is None and not self.progress_error and self.job.output:
                rows.append(("output", f"{self.job.output}   (its progress: barlow status {self.job.output}, or -f SPEC)"))
        if self.progress is not None:
            from barlow.progress import lines  # needs fsspec, which the CLI image lacks (no progress there)

            rows += lines(self.progress, self.time)
        if self.progress_error:
            rows.append(("progress", f"unavailable: {self.progress_error}"))
        return [f"{label + ':':<10} {value}" for label, value in rows]


def _refresh(report: Callable[[], _Report], output: OutputFormat, watch: bool, interval: float,
             count: int | None) -> None:
    """Show `report()` once, or every `interval` seconds: rich Live in a terminal, one screen after another (or one
    JSON line each) otherwise."""
    import json

    from rich.live import Live
    from rich.text import Text

    def show(r: _Report, indent: int | None = None) -> str:
        return json.dumps(r.as_dict(), indent=indent) if output == OutputFormat.json else "\n".join(r.lines())

    if not watch:
        typer.echo(show(report(), indent=2))
        return
    live = Live(console=console, auto_refresh=False) if console.is_terminal and output == OutputFormat.text else None
    done = 0
    try:
        if live is not None:
            live.start()
        while True:
            try:
                screen = show(report())
            except typer.Exit:  # its line is printed; after a first answer, a blip (API server, store) ends no watch
                if not done:
                    raise
                screen = None
            if screen is not None and live is not None:
                live.update(Text(screen), refresh=True)
            elif screen is not None:
                typer.echo(screen if output == OutputFormat.json or not done else "\n" + screen)
            done += 1
            if count is not None and done >= count:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return
    finally:
        if live is not None:
            live.stop()


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
    from barlow.launch import cluster

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    namespace = _namespace(namespace, context)
    with _cluster_errors():
        cluster.logs(cluster.connect(context), name, namespace, replica=replica, follow=follow, write=write,
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
    from barlow.launch import cluster

    b, namespace = _backend(backend), _namespace(namespace, context)
    with _cluster_errors():
        st = cluster.wait(cluster.connect(context), name, namespace, timeout=timeout, poll=poll, on_change=_print_phase, b=b)
    if not st.finished_ok:
        raise fail(f"{b.what} {name} failed: {st.message or 'no message'}")


@app.command(epilog=example("barlow delete my-run -n vision"))
def delete(name: str = JOB, namespace: str = NAMESPACE,
           context: str = CONTEXT, backend: BackendName = BACKEND) -> None:
    """Delete a job; Kubernetes' garbage collector removes what the job owns: its pods, its NetworkPolicy, a
    pipeline's follow-up (its output in output.url stays)."""
    from barlow.launch import cluster

    b, namespace = _backend(backend), _namespace(namespace, context)
    with _cluster_errors():
        cluster.delete(cluster.connect(context), name, namespace, b)
    console.print(f"{b.what} {name} in namespace {namespace}: deleted", highlight=False, soft_wrap=True)


@app.command("list", epilog=example("barlow list -n vision -b trainjob"))
def list_jobs(namespace: str = NAMESPACE, context: str = CONTEXT, backend: BackendName = BACKEND) -> None:
    """List barlow's jobs of one backend in a namespace."""
    from rich.table import Table

    from barlow.launch import cluster

    b, namespace = _backend(backend), _namespace(namespace, context)
    with _cluster_errors():
        jobs = cluster.list_jobs(cluster.connect(context), namespace, b)
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
