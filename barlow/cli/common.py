"""What every CLI module shares: the Typer app, the consoles, and turning a bad spec into exit code 2."""

from __future__ import annotations

import typer
from rich.console import Console

from barlow.errors import EXIT_FAILED
from barlow.errors import EXIT_INVALID_SPEC as EXIT_INVALID  # a spec or argument that fails validation
from barlow.spec import EvalRunSpec, PretrainSpec, SpecError, load_spec

app = typer.Typer(
    name="barlow",
    help="Barlow Twins self-supervised pretraining: run a spec here, or submit it to Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    """Print a one-line error to stderr and return the Exit to raise."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def invalid(problems: list[str], prefix: str = "") -> typer.Exit:
    """Print one error line per spec problem and return the Exit (code 2) to raise."""
    for problem in problems:
        err_console.print(f"[red]error:[/red] {prefix}{problem}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_INVALID)


def load_or_exit(path: str) -> PretrainSpec | EvalRunSpec:
    """Load a spec; on failure print one line per problem and exit 2."""
    try:
        return load_spec(path)
    except SpecError as e:
        raise invalid(e.problems) from None
