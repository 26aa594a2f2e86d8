"""`barlow init [PATH]`: write a commented starter spec that validates as written."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import typer

from barlow.cli.common import EXIT_INVALID, app, console, example, fail

STARTERS = files("barlow.cli") / "starters"  # local.yaml (the demo digits here), cluster.yaml (a GPU cluster)


def starter_text(cluster: bool) -> str:
    return (STARTERS / ("cluster.yaml" if cluster else "local.yaml")).read_text(encoding="utf-8")


@app.command(epilog=example("barlow init spec.yaml", "barlow init --cluster imagenet.yaml"))
def init(
    path: Path = typer.Argument(Path("spec.yaml"), metavar="PATH", help="Where to write the spec."),
    cluster: bool = typer.Option(False, "--cluster", help="A GPU cluster run (ResNet-50 on 8 GPUs, s3:// data) instead "
                                                          "of a local run on the demo digits."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing file."),
) -> None:
    """Write a commented starter spec: a local run on the demo data, or with --cluster a GPU cluster run."""
    if path.is_dir():
        raise fail(f"{path}: is a folder; give the spec file's path (e.g. {path / 'spec.yaml'})", EXIT_INVALID)
    if path.exists() and not force:
        raise fail(f"{path}: already exists; pass --force to overwrite it", EXIT_INVALID)
    text = starter_text(cluster)
    partial = path.with_name(f".{path.name}.partial")  # renamed into place whole: never a half-written spec
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise fail(f"{path}: cannot write ({e.strerror})") from None
    then = (f"barlow plan {path}, then barlow submit pipeline {path}" if cluster
            else f"barlow data demo data/demo, then barlow run pipeline {path}")
    console.print(f"wrote {path}: edit it, check it with barlow validate {path}; then {then}", highlight=False, soft_wrap=True)
