"""`barlow data ...`: image sets: make the demo set, convert folders to shards."""

from __future__ import annotations

import typer

from barlow.cli.common import app, console, fail

data_app = typer.Typer(help="Image sets: make the demo set, convert folders to shards.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command()
def demo(
    dst: str = typer.Argument(..., help="Folder (local path or s3://...) to write train/ and val/ into."),
    size: int = typer.Option(32, min=8, max=256, help="Side of the images in pixels."),
) -> None:
    """Write a small real image set: scikit-learn's handwritten digits as JPEGs in ImageNet layout."""
    from barlow import storage
    from barlow.data.demo import write_demo

    if storage.exists(storage.join(dst, "train")) and storage.list_names(storage.join(dst, "train")):
        console.print(f"{dst}: demo set already there, nothing to do")
        return
    try:
        counts = write_demo(dst, size)
    except OSError as e:
        raise fail(f"{dst}: cannot write the demo set ({e})") from None
    console.print(f"wrote {counts['train']} train and {counts['val']} val images ({size} px, 10 classes) to {dst}")
