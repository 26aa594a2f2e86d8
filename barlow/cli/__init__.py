"""The `barlow` command line: parses arguments and calls one function of the library per command.

Commands live in small modules by topic (run, data, cluster, starter); each registers itself on `app`.
"""

from __future__ import annotations

import json

import typer

from barlow import __version__
from barlow.cli.common import DEBUG_ENV, EXIT_INVALID, SET, SPEC, app, console, example, fail, load_or_exit

# Topic modules register their commands on `app` when imported.
from barlow.cli import starter as _starter  # noqa: E402,F401  isort: skip
from barlow.cli import data as _data  # noqa: E402,F401  isort: skip
from barlow.cli import run as _run  # noqa: E402,F401  isort: skip
from barlow.cli import cluster as _cluster  # noqa: E402,F401  isort: skip


def _print_version(value: bool) -> None:
    if value:
        console.print(f"barlow {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _top(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print barlow's version."),
    debug: bool = typer.Option(False, "--debug", help=f"Print the traceback of an unexpected error (also {DEBUG_ENV}=1)."),
) -> None:
    """Barlow Twins self-supervised pretraining: run a spec here, or submit it to Kubernetes."""


@app.command(epilog=example("barlow version"))
def version() -> None:
    """Print barlow's version."""
    console.print(f"barlow {__version__}", highlight=False)


@app.command(epilog=example("barlow validate spec.yaml --set optim.epochs=100"))
def validate(spec: str = SPEC, overrides: list[str] = SET) -> None:
    """Validate a spec and print it resolved, with every default filled in."""
    from barlow.spec import dump_spec

    resolved = load_or_exit(spec, overrides)
    from barlow.launch.manifest import RenderError, check_pod_fields

    try:
        check_pod_fields(resolved)
    except RenderError as e:
        raise fail(str(e), EXIT_INVALID) from None
    typer.echo(dump_spec(resolved), nl=False)


@app.command(epilog=example("barlow schema > barlow.schema.json"))
def schema() -> None:
    """Print the JSON schema of spec files (point your editor's YAML plugin at it)."""
    from barlow.spec import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


def main() -> None:
    app(prog_name="barlow")
