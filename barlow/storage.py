"""fsspec helpers: one way to reach a local path or an s3:// URL, and the commit-marker rule.

A thing (a checkpoint, a shard set, an export) counts as present only once its marker exists, and the
marker is always written last: on S3 a rename is copy + delete, so "write then rename" is not atomic there.
Imports nothing of barlow.
"""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs

COMMIT_MARKER = "_COMPLETE"

_s3_options: dict[str, Any] = {}


def configure_s3(endpoint_url: str | None = None, region: str | None = None, addressing_style: str = "auto",
                 retries: int = 10) -> None:
    """Set how s3:// URLs are reached (credentials come from the environment, never from here)."""
    client_kwargs: dict[str, Any] = {}
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    if region:
        client_kwargs["region_name"] = region
    config: dict[str, Any] = {"retries": {"max_attempts": max(retries, 1), "mode": "adaptive"}}
    if addressing_style != "auto":
        config["s3"] = {"addressing_style": addressing_style}
    _s3_options.clear()
    _s3_options.update(client_kwargs=client_kwargs, config_kwargs=config, retries=max(retries, 1))
    fsspec.config.conf.pop("s3", None)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a URL or local path."""
    options = _s3_options if url.startswith(("s3://", "s3a://")) else {}
    return url_to_fs(url, **options)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL without touching its scheme."""
    return posixpath.join(url.rstrip("/"), *parts) if "://" in url else str(posixpath.join(url, *parts))


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def read_text(url: str) -> str:
    return read_bytes(url).decode()


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


def list_names(url: str) -> list[str]:
    """Names directly under a folder URL (empty when it does not exist)."""
    fs, path = filesystem(url)
    try:
        entries = fs.ls(path, detail=False, refresh=True) if fs.exists(path) else []
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def remove(url: str) -> None:
    """Delete a file or a folder and everything under it; missing is fine."""
    fs, path = filesystem(url)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def commit(folder_url: str) -> None:
    """Mark a folder complete: called after every file in it is written."""
    write_bytes(join(folder_url, COMMIT_MARKER), b"")


def is_complete(folder_url: str) -> bool:
    return exists(join(folder_url, COMMIT_MARKER))
