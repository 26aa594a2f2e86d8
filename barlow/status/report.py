"""One refresh of `barlow status`: the job (where there is one) and the run's files, as text rows or as the `-o json`
document, shown once or again and again (`--watch`). Nothing here knows Kubernetes: the job comes as a `JobReport`
(barlow.launch.pods.JobView) from a function the caller gives. No torch here (the CLI image has none)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console
from rich.live import Live
from rich.text import Text

from barlow.errors import EXIT_FAILED, EXIT_INVALID_SPEC
from barlow.spec import RunSpec

if TYPE_CHECKING:  # runfiles needs fsspec: without it, a job's status stands without its files
    from barlow.status.runfiles import Progress

SCHEMA = "barlow.status/v1"  # the `-o json` document's version: fields are only added within it
RUN_FOLDER_FILES = ("run.json", "metrics.jsonl", "checkpoints")  # what tells a run's folder


class JobReport(Protocol):
    """A job as the report shows it (barlow.launch.pods.JobView)."""

    output: str  # where the job writes (output.url), "" where it does not say

    def as_dict(self) -> dict[str, Any]: ...

    def rows(self) -> list[tuple[str, str]]: ...


class FilesUnreadable(Exception):
    """The run's files could not be read and no job stands in their place; `code` is the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Report:
    """One refresh of `barlow status`."""

    time: float
    job: JobReport | None = None
    progress: Progress | None = None
    progress_error: str = ""

    def as_dict(self) -> dict:
        """The `-o json` document (README: `barlow status -o json`)."""
        job = self.job.as_dict() if self.job else {"job": None, "admission": "", "pods": []}
        return {"schema": SCHEMA, "time": round(self.time, 3), **job,
                "progress": self.progress.as_dict() if self.progress else None, "progress_error": self.progress_error}

    def lines(self) -> list[str]:
        rows: list[tuple[str, str]] = []
        if self.job is not None:
            rows += self.job.rows()
            if self.progress is None and not self.progress_error and self.job.output:
                rows.append(("output", f"{self.job.output}   (its progress: barlow status {self.job.output}, or -f SPEC)"))
        if self.progress is not None:
            from barlow.status.runfiles import lines

            rows += lines(self.progress, self.time)
        if self.progress_error:
            rows.append(("progress", f"unavailable: {self.progress_error}"))
        return [f"{label + ':':<10} {value}" for label, value in rows]

    def screen(self, as_json: bool, indent: int | None = None) -> str:
        """The report as the CLI prints it: the JSON document, or the text rows."""
        return json.dumps(self.as_dict(), indent=indent) if as_json else "\n".join(self.lines())


def gather(job: Callable[[], JobReport] | None, url: str, read: Callable[[str, float], Progress],
           now: float | None = None) -> Report:
    """The job (`job()`, where there is one) and the progress in `url` (`read(url, now)`, where there is a url).
    A job's status stands without its files: an unreadable output is its `progress_error`; with no job it raises
    FilesUnreadable."""
    found = Report(time.time() if now is None else now)
    if job is not None:
        found.job = job()
    if url:
        try:
            found.progress = read(url, found.time)
        except Exception as e:  # the job's status stands without its files (no credentials, a store down)
            why, code = _unreadable(url, e)
            if job is None:
                raise FilesUnreadable(why, code) from None
            found.progress_error = why
    return found


def _unreadable(url: str, e: Exception) -> tuple[str, int]:
    """Why `url` could not be read, in one line, and the exit code where nothing else is shown."""
    if isinstance(e, ImportError):  # an installation without fsspec: a job's status stands without its files
        return f"reading {url} needs {e.name or 'fsspec'}, which this installation lacks (the training image has it)", \
            EXIT_FAILED
    if isinstance(e, FileNotFoundError):
        return str(e), EXIT_INVALID_SPEC
    return f"{url}: {type(e).__name__}: {e}", EXIT_FAILED


def read_output(url: str, spec: RunSpec | None, now: float, endpoint_url: str | None = None) -> Progress:
    """The progress in `url`, read as the run writes it (the spec's S3 endpoint, or `endpoint_url`) with one attempt:
    a store that does not answer is said at once, not after a minute of retries."""
    from barlow import storage
    from barlow.status import runfiles

    settings = spec.data.s3.model_dump() if spec is not None else {}
    storage.configure_s3(storage.S3Settings(**{**settings, "retries": 1,
                                                **({"endpoint_url": endpoint_url} if endpoint_url else {})}))
    return runfiles.read(url, spec.cluster.max_restarts if spec else None, now)


def folder_hint(target: str | None) -> str:
    """Where a job name is also a run folder here: how to ask for the folder instead."""
    if target and any(os.path.exists(os.path.join(target, f)) for f in RUN_FOLDER_FILES):
        return f" ({target} is read as a job name; for the run folder here, write: barlow status ./{target})"
    return ""


def refresh(screen: Callable[[], str], echo: Callable[[str], Any], console: Console, live: bool, interval: float,
            count: int | None, blips: tuple[type[BaseException], ...] = (), between: str = "\n") -> None:
    """Show `screen()` every `interval` seconds until Ctrl-C (or `count` times): rich Live in a terminal (`live`), one
    screen after another otherwise (`between` before each but the first). After a first screen, a refresh that
    raises one of `blips` (its line said already: the API server or the store did not answer) is skipped."""
    shown = Live(console=console, auto_refresh=False) if live else None
    done = 0
    try:
        if shown is not None:
            shown.start()
        while True:
            try:
                text = screen()
            except blips:
                if not done:
                    raise
                text = None
            if text is not None and shown is not None:
                shown.update(Text(text), refresh=True)
            elif text is not None:
                echo(text if not done else between + text)
            done += 1
            if count is not None and done >= count:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return
    finally:
        if shown is not None:
            shown.stop()
