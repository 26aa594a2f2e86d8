"""fsspec helpers: one way to reach a local path or an s3:// URL, retries, and the commit-marker rule.

A thing (a checkpoint, a shard set, an export) counts as present only once its marker exists, and the
marker is always written last: on S3 a rename is copy + delete, so "write then rename" is not atomic there.
Every remote call is retried with exponential backoff and jitter on throttling (503 SlowDown) and on
transient errors (connection refused or reset, timeouts, 500s); "not found" and "forbidden" fail at once.
Imports nothing of barlow.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import posixpath
import random
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

COMMIT_MARKER = "_COMPLETE"
log = logging.getLogger("barlow.storage")
T = TypeVar("T")

_RETRY_BASE, _RETRY_CAP = 0.25, 8.0  # seconds: first pause and longest pause between attempts
# errno values s3fs and the OS give to errors that go away by themselves (EBUSY: 503 SlowDown / ServiceUnavailable)
_TRANSIENT_ERRNO = {errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET,
                    errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN}
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed",
                    "Throttling", "ThrottlingException", "TooManyRequests", "500", "502", "503", "504"}


@dataclass(frozen=True)
class S3Settings:
    """How s3:// URLs are reached (credentials come from the environment, never from here); picklable, so it
    travels with whatever needs it (a loader worker, a thread) instead of living in module state.

    `retries` is the number of attempts of each storage call; botocore's adaptive mode adds its own
    client-side rate limiting on throttling responses underneath (a few quick attempts per call).
    """

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"
    retries: int = 10

    @classmethod
    def of_spec(cls, spec: Any) -> S3Settings:
        """The one conversion of a run spec's `data.s3` into the settings every storage call of the run is given."""
        return cls(**spec.data.s3.model_dump())

    @property
    def attempts(self) -> int:
        return max(self.retries, 1)

    def fs_options(self) -> dict[str, Any]:
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        config: dict[str, Any] = {"retries": {"total_max_attempts": 3, "mode": "adaptive"}, "connect_timeout": 5,
                                  "read_timeout": 30}
        if self.addressing_style != "auto":
            config["s3"] = {"addressing_style": self.addressing_style}
        return {"client_kwargs": client_kwargs, "config_kwargs": config}


_process_default = [S3Settings()]  # what calls without an explicit `s3=` use; set only by configure_s3


def configure_s3(settings: S3Settings | None = None) -> None:
    """Make `settings` the default of calls that pass no `s3=`: for the CLI's data tools (`barlow data`).

    A run (pretrain, eval, the restart budget) builds its settings once from the spec and passes them to every
    call, its data, checkpoints and metrics alike, so it never depends on this default.
    """
    _process_default[0] = settings or S3Settings()
    fsspec.config.conf.pop("s3", None)


def _settings(s3: S3Settings | None) -> S3Settings:
    return s3 if s3 is not None else _process_default[0]


def filesystem(url: str, s3: S3Settings | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a URL or local path.

    fsspec caches filesystems per process (it drops its cache after a fork), so a loader worker calling this
    gets its own S3 client: an s3fs object made in the parent is not fork-safe (and is never closed in the child,
    see `_disown_parent_s3_sessions`).
    """
    if not url.startswith(("s3://", "s3a://")):
        return url_to_fs(url)
    fs, path = url_to_fs(url, **_settings(s3).fs_options())
    fs.retries = 1  # s3fs's own retry loop off: `retry()` below is the one outer loop, with the spec's attempts
    return fs, path


def _disown_parent_s3_sessions() -> None:
    """In a forked child (a loader worker): detach the finalizers of the s3fs filesystems the parent made. Their
    aiobotocore sessions belong to the parent's event loop; finalized in the child (fsspec drops them from its cache
    there, or a garbage cycle pending at the fork is collected) they were closed on the child's loop instead:
    "Task exception was never retrieved ... attached to a different loop". The parent still closes its own.

    The child also keeps them referenced for its whole life: collected there, aiohttp's connector closes the
    parent's connections on the parent's loop copy, and that loop's epoll instance is the parent's own (shared
    across fork), so the parent stopped watching those sockets and waited forever for a response it had received."""
    s3fs = sys.modules.get("s3fs")
    if s3fs is None:
        return
    # weakref.finalize keeps its live finalizers in this class-level registry; peek/detach are its public API
    for finalizer in list(getattr(weakref.finalize, "_registry", {})):
        held = finalizer.peek()
        if held is not None and isinstance(held[0], s3fs.S3FileSystem):
            _PARENTS_S3.append(held)  # never collected here: see above
            finalizer.detach()
    for fs in list(getattr(s3fs.S3FileSystem, "_cache", {}).values()):  # fsspec clears its cache in the child
        _PARENTS_S3.append(fs)


_PARENTS_S3: list[object] = []  # a forked child's copies of the parent's s3fs filesystems, kept from collection


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_parent_s3_sessions)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def is_transient(exc: BaseException) -> bool:
    """Whether an error from a storage call is worth another attempt (throttling, network, 5xx)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return True
    response = getattr(exc, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    if code in _TRANSIENT_CODES:
        return True
    names = {c.__name__ for c in type(exc).__mro__}
    # botocore's network errors, aiohttp's, and fsspec's timeout, by name so this module needs neither installed
    if names & {"HTTPClientError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                "ConnectTimeoutError", "IncompleteReadError", "ResponseStreamingError", "ClientConnectionError",
                "ClientPayloadError", "ServerDisconnectedError", "ClientOSError", "FSTimeoutError", "IncompleteRead"}:
        return True
    text = str(exc)
    return any(s in text for s in ("SlowDown", "reduce your request rate", "Service Unavailable", "ServiceUnavailable"))


def retry(fn: Callable[..., T], *args: Any, what: str, s3: S3Settings | None = None, **kwargs: Any) -> T:
    """fn(*args, **kwargs), again after a growing, jittered pause while it fails with a transient error."""
    attempts = _settings(s3).attempts
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if type(e).__name__ == "NoCredentialsError":  # botocore's, with no URL in it: say which and where from
                raise PermissionError(f"{what}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                                      "AWS_SECRET_ACCESS_KEY; on a cluster, the Secret in cluster.s3_secret)") from None
            if attempt == attempts or not is_transient(e):
                raise
            pause = min(_RETRY_CAP, _RETRY_BASE * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning("%s: %s (attempt %d of %d, again in %.1fs)", what, type(e).__name__, attempt, attempts, pause)
            _invalidate(what, s3)
            time.sleep(pause)
    raise AssertionError("unreachable")


def wait_until_reachable(url: str, s3: S3Settings | None = None, within_s: float = 300.0,
                         say: Callable[[str], None] = log.warning) -> BaseException | None:
    """Wait (with growing, jittered pauses) until the store holding `url` answers, for at most `within_s` seconds:
    a pod that starts while a gateway or DNS is down waits it out. Returns None once it answers (or when the
    answer is an error a wait cannot fix, left to the caller's own call to report), else the last transient error.
    `say` gets one line the first time it fails."""
    if is_local(url):
        return None
    deadline, attempt = time.monotonic() + within_s, 0
    while True:
        attempt += 1
        try:
            fs, path = filesystem(url, s3)
            fs.exists(path)
            return None
        except Exception as e:
            if not is_transient(e):
                return None
            if attempt == 1:  # said even when the first try alone used up the wait: the give-up then has a cause
                say(f"{endpoint(s3)} unreachable ({type(e).__name__}); waiting up to {within_s:.0f} s for it")
            left = deadline - time.monotonic()
            if left <= 0:
                return e
            _invalidate(url, s3)
            time.sleep(min(left, min(_RETRY_CAP, _RETRY_BASE * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)))


def endpoint(s3: S3Settings | None = None) -> str:
    """The S3 endpoint calls go to, for messages."""
    return f"object storage at {_settings(s3).endpoint_url or 'AWS S3'}"


def _invalidate(url: str, s3: S3Settings | None = None) -> None:
    """Forget cached listings so a retry sees the store as it is now."""
    try:
        fs, _ = filesystem(url, s3)
        fs.invalidate_cache()
    except Exception:  # a cache we cannot clear only costs freshness
        pass


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL without touching its scheme."""
    return posixpath.join(url.rstrip("/"), *parts) if "://" in url else str(posixpath.join(url, *parts))


def exists(url: str, s3: S3Settings | None = None) -> bool:
    fs, path = filesystem(url, s3)
    return retry(fs.exists, path, what=url, s3=s3)


def size(url: str, s3: S3Settings | None = None) -> int:
    """Size of a file in bytes; FileNotFoundError when missing."""
    fs, path = filesystem(url, s3)
    return int(retry(fs.size, path, what=url, s3=s3))


def read_bytes(url: str, s3: S3Settings | None = None) -> bytes:
    if "://" not in url:  # a plain local path (the per-image hot path of image folders): no fsspec lookup
        return retry(_read_local, url, what=url, s3=s3)
    fs, path = filesystem(url, s3)
    return retry(fs.cat_file, path, what=url, s3=s3)


def _read_local(path: str) -> bytes:
    with open(os.path.expanduser(path), "rb") as f:
        return f.read()


def find(url: str, s3: S3Settings | None = None) -> list[str]:
    """Every file under a folder URL, as URLs of the same scheme (empty when it does not exist)."""
    fs, path = filesystem(url, s3)
    if not retry(fs.isdir, path, what=url, s3=s3):
        return []
    prefix = url[: url.index("://") + 3] if "://" in url and not is_local(url) else ""
    return sorted(prefix + p for p in retry(fs.find, path, what=url, s3=s3))


def read_range(url: str, start: int, end: int, s3: S3Settings | None = None) -> bytes:
    """Bytes [start, end) of a file (one ranged GET on S3)."""
    fs, path = filesystem(url, s3)
    return retry(fs.cat_file, path, start=start, end=end, what=url, s3=s3)


def _makedirs_for(fs: fsspec.AbstractFileSystem, path: str) -> None:
    parent = posixpath.dirname(path)
    if parent and "file" in _protocols(fs):  # object stores have no folders to make
        fs.makedirs(parent, exist_ok=True)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def write_bytes(url: str, data: bytes, s3: S3Settings | None = None) -> None:
    """Write a whole file; readers see the old file or the new one, never a part (S3 PUT, local rename)."""
    write_with(url, lambda f: f.write(data), s3)


def write_with(url: str, write: Callable[[IO[bytes]], Any], s3: S3Settings | None = None) -> None:
    """`write(f)` into a file that appears at `url` only once complete (`open_atomic`), all of it again after a
    transient error: the data streams out as `write` produces it, with no whole copy of it in memory."""
    def put() -> None:
        with open_atomic(url, s3) as f:
            write(f)
    retry(put, what=url, s3=s3)


@contextmanager
def open_atomic(url: str, s3: S3Settings | None = None) -> Iterator[IO[bytes]]:
    """A binary file to write that appears at `url` only when the block ends without an error.

    Local: a temporary name beside it, renamed on success. Object stores: the upload completes on close
    and is aborted on error, so a crash never leaves a half-written object under the final name.
    """
    fs, path = filesystem(url, s3)
    _makedirs_for(fs, path)
    if "file" in _protocols(fs):
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    f = fs.open(path, "wb")
    try:
        yield f
    except BaseException:
        f.discard()  # aborts a multipart upload; the object never appears
        f.closed = True  # so that garbage collection cannot complete the upload
        raise
    f.close()


def write_text(url: str, text: str, s3: S3Settings | None = None) -> None:
    write_bytes(url, text.encode(), s3)


def read_text(url: str, s3: S3Settings | None = None) -> str:
    return read_bytes(url, s3).decode()


def list_names(url: str, s3: S3Settings | None = None) -> list[str]:
    """Names directly under a folder URL (empty when it does not exist)."""
    fs, path = filesystem(url, s3)

    def ls() -> list[str]:
        try:
            return fs.ls(path, detail=False, refresh=True) if fs.exists(path) else []
        except FileNotFoundError:
            return []
    # some S3 servers (SeaweedFS) list an emptied folder's own marker inside it: never a child
    return sorted(posixpath.basename(e.rstrip("/")) for e in retry(ls, what=url, s3=s3) if e.rstrip("/") != path.rstrip("/"))


def remove(url: str, s3: S3Settings | None = None) -> None:
    """Delete a file or a folder and everything under it; missing is fine."""
    fs, path = filesystem(url, s3)

    def rm() -> None:
        s3 = "s3" in _protocols(fs)
        try:
            keys = fs.find(path) if s3 else []
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            return
        if s3:
            _remove_folder_markers(fs, path, keys)
    retry(rm, what=url, s3=s3)
    _invalidate(url, s3)


def _remove_folder_markers(fs: fsspec.AbstractFileSystem, path: str, keys: list[str]) -> None:
    """Delete `folder/` keys, deepest first: SeaweedFS keeps emptied folders listed until they are (S3 has none)."""
    root = path.rstrip("/")
    folders = {root}
    for key in keys:
        parent = posixpath.dirname(key)
        while parent.startswith(root + "/"):
            folders.add(parent)
            parent = posixpath.dirname(parent)
    for folder in sorted(folders, key=lambda f: f.count("/"), reverse=True):
        bucket, _, prefix = folder.partition("/")
        if prefix:
            fs.call_s3("delete_object", Bucket=bucket, Key=prefix + "/")


def commit(folder_url: str, s3: S3Settings | None = None) -> None:
    """Mark a folder complete: called after every file in it is written."""
    write_bytes(join(folder_url, COMMIT_MARKER), b"", s3)


def is_complete(folder_url: str, s3: S3Settings | None = None) -> bool:
    return exists(join(folder_url, COMMIT_MARKER), s3)


class RangeReader(io.RawIOBase):
    """A sequential, read-only view of a remote file fetched in large ranged GETs, each retried on its own.

    A dropped connection or a server restart mid-file costs one chunk's retry, not the whole file; the next
    chunk is fetched in a background thread while the caller works on the current one.
    """

    def __init__(self, url: str, chunk_size: int = 8 << 20, file_size: int | None = None, s3: S3Settings | None = None):
        super().__init__()
        self.url, self.s3 = url, s3
        self.chunk_size = chunk_size
        self.file_size = size(url, s3) if file_size is None else file_size
        self._pos = 0
        self._buf = b""
        self._buf_start = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._next: Future[bytes] | None = None
        self._next_start = 0
        self._lock = threading.Lock()

    def readable(self) -> bool:
        return True

    def _fetch(self, start: int) -> Future[bytes]:
        end = min(start + self.chunk_size, self.file_size)
        return self._pool.submit(read_range, self.url, start, end, self.s3)

    def readinto(self, b: Any) -> int:
        if self._pos >= self.file_size:
            return 0
        offset = self._pos - self._buf_start
        if not 0 <= offset < len(self._buf):
            with self._lock:
                fut = self._next if self._next is not None and self._next_start == self._pos else self._fetch(self._pos)
                self._buf, self._buf_start = fut.result(), self._pos
                self._next = None
                following = self._pos + len(self._buf)
                if following < self.file_size:
                    self._next, self._next_start = self._fetch(following), following
            if not self._buf:
                raise OSError(errno.EIO, f"{self.url}: no data at byte {self._pos} of {self.file_size}")
            offset = 0
        n = min(len(b), len(self._buf) - offset)
        b[:n] = self._buf[offset:offset + n]
        self._pos += n
        return n

    def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()


def open_read(url: str, chunk_size: int = 8 << 20, s3: S3Settings | None = None) -> IO[bytes]:
    """A buffered sequential reader: a plain file locally, a retrying RangeReader elsewhere."""
    if is_local(url):
        return open(filesystem(url)[1], "rb", buffering=1 << 20)
    return io.BufferedReader(RangeReader(url, chunk_size, s3=s3), buffer_size=1 << 20)
