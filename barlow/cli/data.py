"""`barlow data ...`: image sets: make the demo set, convert folders to shards."""

from __future__ import annotations

import typer

from barlow.cli.common import EXIT_INVALID, app, console, example, fail

data_app = typer.Typer(help="Image sets: make the demo set, convert folders to shards.", no_args_is_help=True,
                       epilog=example("barlow data demo data/demo"))
app.add_typer(data_app, name="data")


def _url(option: str, url: str, write: bool) -> str:
    """The URL, checked as the spec checks data.* (read) and output.url (write)."""
    from barlow.spec import check_url

    try:
        return check_url(url, write=write)
    except ValueError as e:
        raise fail(f"{option} {url}: {e}", EXIT_INVALID) from None


@data_app.command(epilog=example("barlow data demo data/demo"))
def demo(
    dst: str = typer.Argument(..., metavar="DST", help="Folder (local path or s3://...) to write train/ and val/ into."),
    size: int = typer.Option(32, min=8, max=256, help="Side of the images in pixels."),
    force: bool = typer.Option(False, "--force", help="Write train/ and val/ into a folder that holds other files."),
) -> None:
    """Write a small real image set: scikit-learn's handwritten digits as JPEGs in ImageNet layout."""
    from barlow import storage
    from barlow.data.demo import write_demo

    dst = _url("DST", dst, write=True)
    try:
        if storage.list_names(storage.join(dst, "train")) == [str(d) for d in range(10)]:
            console.print(f"{dst}: demo set already there, nothing to do")
            return
        there = storage.list_names(dst)
        if there and not force:
            raise fail(f"DST {dst}: not empty ({len(there)} entries, e.g. {there[0]}) and no demo set: choose a new "
                       "or empty folder, or pass --force to write train/ and val/ among them", EXIT_INVALID)
        counts = write_demo(dst, size)
    except OSError as e:
        raise fail(f"{dst}: cannot write the demo set ({e})") from None
    console.print(f"wrote {counts['train']} train and {counts['val']} val images ({size} px, 10 classes) to {dst}")


@data_app.command(epilog=example("barlow data shard imagenet/train s3://datasets/imagenet-shards/train --endpoint-url "
                                  "https://s3.example.com"))
def shard(
    src: str = typer.Argument(..., metavar="SRC", help="Image folder in ImageNet layout (<class>/<image>): local path or s3://..."),
    dst: str = typer.Argument(..., metavar="DST", help="Folder for the shards and index.json: local path or s3://..."),
    shard_size_mb: int = typer.Option(256, "--shard-size-mb", min=1, max=100_000, help="Largest shard, in MiB."),
    workers: int = typer.Option(4, min=1, max=256, help="Shards written at the same time."),
    seed: int = typer.Option(0, min=0, help="Seed of the image order (images are shuffled across shards)."),
    endpoint_url: str = typer.Option(None, help="S3 endpoint for s3:// URLs (credentials come from the environment)."),
    region: str = typer.Option(None, help="S3 region."),
    addressing_style: str = typer.Option("auto", help="S3 addressing style: auto, virtual or path."),
) -> None:
    """Convert an image folder into tar shards + index.json (a rerun skips the shards already complete)."""
    from barlow import storage
    from barlow.data.shards import write_shards

    if addressing_style not in ("auto", "virtual", "path"):
        raise fail(f"--addressing-style: must be auto, virtual or path (got {addressing_style})", 2)
    src, dst = _url("SRC", src, write=False), _url("DST", dst, write=True)
    storage.configure_s3(storage.S3Settings(endpoint_url, region, addressing_style))
    try:
        done = write_shards(src, dst, shard_size=shard_size_mb << 20, workers=workers, seed=seed)
    except (OSError, ValueError, RuntimeError) as e:
        raise fail(str(e)) from None
    console.print(f"{done['index']}: {done['samples']} images, {done['classes']} classes, {done['shards']} shards "
                  f"({done['written']} written, {done['skipped']} already complete), {done['bytes'] / 2**20:.1f} MiB")


@data_app.command(epilog=example("barlow data index s3://photos/2024 --endpoint-url https://s3.example.com"))
def index(
    url: str = typer.Argument(..., metavar="URL", help="Image folder (any layout), WebDataset shards (a brace pattern "
                              "or folder of .tar) or parquet files (a folder or glob): local path or s3://..."),
    data_format: str = typer.Option("imagefolder", "--format", help="imagefolder, webdataset or parquet (as data.format)."),
    endpoint_url: str = typer.Option(None, help="S3 endpoint for s3:// URLs (credentials come from the environment)."),
    region: str = typer.Option(None, help="S3 region."),
    addressing_style: str = typer.Option("auto", help="S3 addressing style: auto, virtual or path."),
) -> None:
    """List an image folder (or count WebDataset / parquet samples) once, ahead of the runs, into barlow-index.json
    beside the data: every run reads that instead of listing again (run it again after adding data)."""
    from barlow import storage
    from barlow.data.listing import INDEX_NAME, describe, labelled_images, list_folder

    if addressing_style not in ("auto", "virtual", "path"):
        raise fail(f"--addressing-style: must be auto, virtual or path (got {addressing_style})", EXIT_INVALID)
    if data_format not in ("imagefolder", "webdataset", "parquet"):
        raise fail(f"--format: must be imagefolder, webdataset or parquet (got {data_format})", EXIT_INVALID)
    url = _url("URL", url, write=True).rstrip("/")
    storage.configure_s3(storage.S3Settings(endpoint_url, region, addressing_style))
    try:
        if data_format == "imagefolder":
            listing = list_folder(url)
            classes, images = labelled_images(listing)
            where, what = storage.join(url, INDEX_NAME), describe(len(images), len(classes), listing.layout())
            storage.write_text(where, listing.to_json())
        else:
            from barlow.data import parquet, tarindex

            module = tarindex if data_format == "webdataset" else parquet
            index = module.build_index(url)
            where = index.url  # barlow-index.json in the shards' folder
            storage.write_text(where, tarindex.to_json(index, url, module.INDEX_FORMAT))
            labels = f"{len(index.classes)} classes" if index.classes else "unlabelled"
            what = f"{index.num_samples:,} images, {labels}"
    except (OSError, ValueError) as e:
        raise fail(str(e)) from None
    console.print(f"{where}: {what}")
