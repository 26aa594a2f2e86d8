"""storage: the helpers on the real S3 server, retries on throttling and outages, writes that appear whole or not at all."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

import pytest
import s3fs
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from s3server import SlowDownProxy

from barlow import storage


@pytest.mark.parametrize("exc, transient", [
    (ConnectionRefusedError(), True),
    (TimeoutError(), True),
    (OSError(errno.EBUSY, "SlowDown"), True),  # what s3fs makes of a 503 SlowDown
    (OSError(errno.EREMOTEIO, "We encountered an internal error"), True),  # a 500
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
    (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
    (ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}}, "GetObject"), True),
    (FileNotFoundError("s3://b/k"), False),
    (PermissionError("Forbidden"), False),
    (ValueError("bad"), False),
    (ClientError({"Error": {"Code": "NoSuchBucket", "Message": "no"}}, "GetObject"), False),
])
def test_what_counts_as_transient(exc, transient):
    assert storage.is_transient(exc) is transient


def test_helpers_on_s3(s3):
    run = f"{s3.url}/run"
    storage.write_text(storage.join(run, "ckpt-1", "state.pt"), "weights")
    assert not storage.is_complete(storage.join(run, "ckpt-1"))
    storage.commit(storage.join(run, "ckpt-1"))
    assert storage.is_complete(storage.join(run, "ckpt-1"))
    assert storage.read_text(storage.join(run, "ckpt-1", "state.pt")) == "weights"
    assert storage.exists(storage.join(run, "ckpt-1", "state.pt")) and storage.size(storage.join(run, "ckpt-1", "state.pt")) == 7
    assert storage.list_names(run) == ["ckpt-1"] and storage.list_names(f"{s3.url}/nothing") == []
    assert storage.read_range(storage.join(run, "ckpt-1", "state.pt"), 2, 5) == b"igh"
    storage.remove(storage.join(run, "ckpt-1"))
    assert storage.list_names(run) == [] and not storage.exists(storage.join(run, "ckpt-1", "state.pt"))
    storage.remove(storage.join(run, "ckpt-1"))  # missing is fine


@pytest.mark.parametrize("where", ["local", "s3"])
def test_open_atomic_writes_whole_or_nothing(where, tmp_path, request):
    base = request.getfixturevalue("s3").url if where == "s3" else str(tmp_path)
    url = storage.join(base, "sub", "big.bin")
    blob = os.urandom(12 << 20)  # above s3fs's 5 MiB part size: a multipart upload that must be aborted
    with pytest.raises(RuntimeError, match="crash"):
        with storage.open_atomic(url) as f:
            f.write(blob)
            raise RuntimeError("crash mid-write")
    assert not storage.exists(url) and storage.list_names(storage.join(base, "sub")) == []
    with storage.open_atomic(url) as f:
        f.write(blob)
    assert storage.read_bytes(url) == blob


def test_server_listens_on_loopback_only(s3_server):
    addresses = s3_server.listening_addresses()
    assert addresses and addresses <= {"127.0.0.1"}, addresses


@pytest.mark.parametrize("fail, retries, succeeds", [(4, 10, True), (50, 1, False)])
def test_slowdown_is_retried_with_backoff(s3, fail, retries, succeeds):
    url = f"{s3.url}/throttled.bin"
    storage.write_bytes(url, b"payload" * 100)
    port = int(s3.server.endpoint_url.rsplit(":", 1)[1])
    with SlowDownProxy(port, fail) as proxy:
        storage.configure_s3(storage.S3Settings(endpoint_url=proxy.url, retries=retries))
        if succeeds:
            assert storage.read_bytes(url) == b"payload" * 100
            storage.write_bytes(f"{s3.url}/written-through-throttling", b"ok")
            assert proxy.throttled == fail and proxy.passed >= 2
        else:
            with pytest.raises(OSError) as info:
                storage.read_bytes(url)
            assert info.value.errno == errno.EBUSY  # SlowDown, reported as such once the attempts are spent
            assert proxy.throttled == 3  # botocore's own 3 quick attempts; one outer attempt with retries=1
    storage.configure_s3(storage.S3Settings(endpoint_url=s3.server.endpoint_url))
    if succeeds:
        assert storage.read_bytes(f"{s3.url}/written-through-throttling") == b"ok"


@pytest.mark.slow
def test_range_reader_survives_server_restart_mid_file(s3, caplog):
    url = f"{s3.url}/long.bin"
    blob = os.urandom(3 << 20)
    storage.write_bytes(url, blob)
    got = bytearray()
    with caplog.at_level(logging.WARNING, logger="barlow.storage"):
        reader = storage.RangeReader(url, chunk_size=256 << 10)
        got += reader.read(600 << 10)
        s3.server.stop()  # down between two chunks (one may already be prefetched)
        threading.Timer(2.0, s3.server.start).start()
        time.sleep(0.1)
        while chunk := reader.read(100 << 10):
            got += chunk
        reader.close()
    assert bytes(got) == blob
    assert any("attempt 1 of" in r.getMessage() for r in caplog.records)  # the outage was met and retried


def test_missing_credentials_are_one_line_naming_the_url(s3_server, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata look-up on a laptop or CI
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would still hold the earlier tests' credentials
    url = f"s3://{s3_server.bucket}/no-credentials/index.json"
    try:
        with pytest.raises(PermissionError, match=rf"^{url}: no S3 credentials found \(set AWS_ACCESS_KEY_ID"):
            storage.read_bytes(url, s3=storage.S3Settings(endpoint_url=s3_server.endpoint_url, retries=2))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # nor may the credential-less client serve the tests after this one


@pytest.mark.parametrize("form", ["plain", "file-url", "home"])
def test_read_bytes_of_local_paths(form, tmp_path, monkeypatch):
    """Plain local paths take a direct read (no fsspec lookup); every form reads the same bytes, and a missing file
    is FileNotFoundError at once (not retried)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "a.bin").write_bytes(b"\x00bytes\xff")
    url = {"plain": str(tmp_path / "a.bin"), "file-url": f"file://{tmp_path}/a.bin", "home": "~/a.bin"}[form]
    assert storage.read_bytes(url) == b"\x00bytes\xff"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(url.replace("a.bin", "missing.bin"))


def test_a_starting_run_waits_for_a_store_that_comes_back(s3):
    port = int(s3.server.endpoint_url.rsplit(":", 1)[1])
    said = []
    with SlowDownProxy(port, fail=6) as proxy:  # 503s for a while (two of botocore's rounds of 3), then it answers
        settings = storage.S3Settings(endpoint_url=proxy.url, retries=1)
        assert storage.wait_until_reachable(f"{s3.url}/run", settings, within_s=60, say=said.append) is None
        assert proxy.throttled == 6 and proxy.passed >= 1
    assert len(said) == 1 and proxy.url in said[0]  # one line, naming the endpoint


def test_a_store_that_stays_down_is_given_up_after_the_stated_time(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    settings = storage.S3Settings(endpoint_url="http://127.0.0.1:9", retries=1)  # nothing listens on port 9
    said = []
    down = storage.wait_until_reachable("s3://bucket/run", settings, within_s=2, say=said.append)
    assert storage.is_transient(down) and len(said) == 1 and "http://127.0.0.1:9" in said[0]


def test_a_forked_child_leaves_the_parents_s3_connections_alone(s3):
    """A loader worker inherits the training process's s3fs filesystem and its pooled connections. Collected in the
    child, aiohttp closed them on the parent's loop copy, whose epoll instance is the parent's own: the parent then
    never saw the response to its next request on such a connection (a run hung in Metrics.sync)."""
    import gc
    import time

    url = f"{s3.url}/fork/a.txt"
    storage.write_text(url, "one", s3.settings)  # the parent's filesystem now pools a connection
    pid = os.fork()
    if pid == 0:  # the child: drop what fsspec cached, collect it, exit without cleanup
        storage.filesystem(url, s3.settings)  # a new instance here clears fsspec's inherited cache
        gc.collect()
        os._exit(0)
    os.waitpid(pid, 0)
    start = time.monotonic()
    assert storage.read_text(url, s3.settings) == "one"
    assert time.monotonic() - start < 10  # the read timeout (30 s) and retries were not needed
