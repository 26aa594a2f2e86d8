"""What every CLI module shares: the Typer app, the consoles, turning a bad spec into exit code 2, and the one
handler that turns any other uncaught exception into one line."""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from barlow.errors import EXIT_FAILED
from barlow.errors import EXIT_INVALID_SPEC as EXIT_INVALID  # a spec or argument that fails validation
from barlow.spec import OVERRIDE_HELP, EvalRunSpec, PretrainSpec, SpecError, load_spec

DEBUG_ENV = "BARLOW_DEBUG"  # 1: an unexpected error prints its traceback (as --debug does)
PACKAGE = Path(__file__).resolve().parents[1]


class BarlowGroup(TyperGroup):
    """The top-level group: any exception no command turned into its own one-line error ends as one line here."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _CLI_EXITS:
            raise
        except Exception as e:
            if ctx.params.get("debug") or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes"):
                raise
            err_console.print(f"[red]error:[/red] {unexpected(e, ctx)}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_FAILED) from None


# Exits and usage errors of the CLI framework itself (Typer vendors click from 0.29 on, imports it before)
_CLI_EXITS = (typer.Exit, typer.Abort, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))


def unexpected(e: BaseException, ctx: typer.Context | None = None) -> str:
    """One line for an exception no command expected: what failed, the exception, and where in barlow."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(PACKAGE)] or frames
    where = ""
    if ours:
        f = ours[-1]
        name = Path(f.filename).resolve()
        shown = name.relative_to(PACKAGE.parent) if name.is_relative_to(PACKAGE.parent) else name
        where = f" at {shown}:{f.lineno} in {f.name}()"
    command = " ".join(["barlow", *([ctx.invoked_subcommand] if ctx and ctx.invoked_subcommand else [])])
    message = " ".join(str(e).split()) or "no message"
    return (f"{command} failed: {type(e).__name__}: {message}{where} (unexpected: `barlow --debug ...` or "
            f"{DEBUG_ENV}=1 prints the traceback)")


app = typer.Typer(
    name="barlow",
    cls=BarlowGroup,
    help="Barlow Twins self-supervised pretraining: run a spec here, or submit it to Kubernetes.",
    epilog="Example: barlow init spec.yaml && barlow validate spec.yaml && barlow run pipeline spec.yaml",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

SET = typer.Option(None, "--set", metavar="KEY.PATH=VALUE", help=OVERRIDE_HELP)
SPEC_HELP = "Path to a run spec (YAML)."
SPEC = typer.Argument(..., metavar="SPEC", help=SPEC_HELP)
JOB = typer.Argument(..., metavar="NAME", help="Job name (the run name).")


def example(*lines: str) -> str:
    """A command's --help epilog: its examples, one a line."""
    return "Example: " + lines[0] if len(lines) == 1 else "Examples:\n" + "\n".join(f"  {line}" for line in lines)

def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    """Print a one-line error to stderr and return the Exit to raise."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def invalid(problems: list[str], prefix: str = "") -> typer.Exit:
    """Print one error line per spec problem and return the Exit (code 2) to raise."""
    for problem in problems:
        err_console.print(f"[red]error:[/red] {prefix}{problem}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_INVALID)


def load_or_exit(path: str, overrides: Sequence[str] | None = None) -> PretrainSpec | EvalRunSpec:
    """Load a spec with its `--set` overrides; on failure print one line per problem and exit 2."""
    try:
        return load_spec(path, overrides or ())
    except SpecError as e:
        raise invalid(e.problems) from None
