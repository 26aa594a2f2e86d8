"""The `barlow` command line: parses arguments and calls one function of the library per command.

Commands live in small modules by topic (run, data, cluster); each registers itself on `app`.
"""

from __future__ import annotations

import json

import typer

from barlow import __version__
from barlow.cli.common import app, console, load_or_exit

# Topic modules register their commands on `app` when imported.
from barlow.cli import data as _data  # noqa: E402,F401  isort: skip
from barlow.cli import run as _run  # noqa: E402,F401  isort: skip
from barlow.cli import cluster as _cluster  # noqa: E402,F401  isort: skip


@app.command()
def version() -> None:
    """Print barlow's version."""
    console.print(f"barlow {__version__}")


@app.command()
def validate(spec: str = typer.Argument(..., help="Path to a run spec (YAML).")) -> None:
    """Validate a spec and print it resolved, with every default filled in."""
    from barlow.spec import dump_spec

    resolved = load_or_exit(spec)
    typer.echo(dump_spec(resolved), nl=False)


@app.command()
def schema() -> None:
    """Print the JSON schema of spec files (point your editor's YAML plugin at it)."""
    from barlow.spec import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


def main() -> None:
    app()
