"""Progress to Kubeflow Trainer's status server, against a local HTTPS server on loopback standing in for it (its
certificate made here, self-signed, for 127.0.0.1): the request's exact shape, the token re-read at every POST, TLS
checked against the CA file, and a server that fails or is not there changes nothing but one log line."""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from barlow import trainer_status
from barlow.metrics import Metrics

PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team/trainjobs/demo/status"  # the shape of the Trainer's URL


def _cert(tmp_path, name: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


class StatusServer:
    """HTTPS on a free loopback port; records (path, Authorization, body) of each POST; answers `code`."""

    def __init__(self, cert: str, key: str, code: int = 200):
        self.posts: list[tuple[str, str, dict]] = []
        self.code = code
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.posts.append((self.path, self.headers.get("Authorization"), body))
                payload = json.dumps(body if server.code == 200 else {"status": "Failure"}).encode()
                self.send_response(server.code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.httpd.server_address[1]}{PATH}"

    def __enter__(self) -> StatusServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def trainer(tmp_path):
    cert, key = _cert(tmp_path, "status-server")
    token = tmp_path / "token"
    token.write_text("token-one\n")
    with StatusServer(cert, key) as server:
        yield server, cert, token


def _wait_for(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def test_posts_have_the_trainers_shape_and_follow_a_rotated_token(trainer):
    server, ca, token = trainer
    said = []
    reporter = trainer_status.Reporter(server.url, ca, str(token), total_steps=200, start_step=0, min_interval_s=0.2,
                                       say=said.append)
    reporter.update(10, {"loss": 1234.5, "lr": 0.2, "images_per_s": 88.0, "knn_top1": 41.25})
    _wait_for(lambda: len(server.posts) >= 1)
    token.write_text("token-two\n")  # the kubelet rotates the projected token in place
    reporter.update(50, {"loss": 1000.0, "probe_top1": float("nan")})
    _wait_for(lambda: len(server.posts) >= 2)
    reporter.close(finished=True)
    assert said == []
    paths, auths, bodies = zip(*server.posts, strict=True)
    assert set(paths) == {PATH}
    assert auths[0] == "Bearer token-one" and auths[-1] == "Bearer token-two"
    first = bodies[0]["trainerStatus"]
    assert set(bodies[0]) == {"trainerStatus"}
    assert set(first) == {"progressPercentage", "estimatedRemainingSeconds", "metrics", "lastUpdatedTime"}
    assert first["progressPercentage"] == 5 and isinstance(first["estimatedRemainingSeconds"], int)
    assert first["metrics"] == [{"name": "loss", "value": "1234.5"}, {"name": "lr", "value": "0.2"},
                                {"name": "images_per_s", "value": "88"}, {"name": "knn_top1", "value": "41.25"}]
    assert RFC3339.match(first["lastUpdatedTime"])
    percents = [b["trainerStatus"]["progressPercentage"] for b in bodies]
    assert percents == sorted(percents) and percents[-1] == 100  # never decreasing, 100 at the end
    last = bodies[-1]["trainerStatus"]
    assert last["estimatedRemainingSeconds"] == 0
    assert {"name": "loss", "value": "1000"} in last["metrics"]  # the NaN probe value is left out, not sent
    assert all(1 <= len(m["name"]) <= 64 and 1 <= len(m["value"]) <= 64 for b in bodies for m in b["trainerStatus"]["metrics"])


def test_at_most_one_post_an_interval(trainer):
    server, ca, token = trainer
    reporter = trainer_status.Reporter(server.url, ca, str(token), total_steps=10_000, min_interval_s=1.0)
    started = time.monotonic()
    for step in range(1, 400):
        reporter.update(step, {"loss": float(step)})
        time.sleep(0.005)
    elapsed = time.monotonic() - started
    reporter.close(finished=False)
    assert 1 <= len(server.posts) <= elapsed / 1.0 + 2  # the updates of each interval are folded into one POST
    assert server.posts[-1][2]["trainerStatus"]["metrics"] == [{"name": "loss", "value": "399"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("server_state", ["answers 500", "not listening", "another CA"])
def test_a_failing_status_server_changes_nothing_but_one_log_line(tmp_path, trainer, server_state):
    server, ca, token = trainer
    url = server.url
    if server_state == "answers 500":
        server.code = 500
    elif server_state == "not listening":
        url = f"https://127.0.0.1:{_free_port()}{PATH}"
    else:
        ca, _ = _cert(tmp_path, "someone-else")  # TLS is verified: a server the CA file does not vouch for is refused
    said = []
    reporter = trainer_status.Reporter(url, ca, str(token), total_steps=100, min_interval_s=0.05, timeout_s=1.0,
                                       say=said.append)
    for step in range(1, 101):
        reporter.update(step, {"loss": 1.0})
        time.sleep(0.01)
    reporter.close(finished=True)
    assert reporter.posted == 0 and len(said) == 1 and url in said[0]
    if server_state == "answers 500":
        assert len(server.posts) >= 2  # it kept trying, quietly
    else:
        assert server.posts == []


def test_without_the_trainers_variables_nothing_reports(monkeypatch, tmp_path):
    for name in (trainer_status.URL_ENV, trainer_status.CA_ENV, trainer_status.TOKEN_ENV):
        monkeypatch.delenv(name, raising=False)
    assert trainer_status.from_env(100) is None
    metrics = Metrics(str(tmp_path / "run"), enabled=True, total_steps=10)
    assert metrics.reporter is None
    metrics.close()


def test_the_runs_metrics_lines_reach_the_status_server(trainer, monkeypatch, tmp_path):
    server, ca, token = trainer
    monkeypatch.setenv(trainer_status.URL_ENV, server.url)
    monkeypatch.setenv(trainer_status.CA_ENV, ca)
    monkeypatch.setenv(trainer_status.TOKEN_ENV, str(token))
    metrics = Metrics(str(tmp_path / "run"), enabled=True, total_steps=20)
    for step in range(1, 21):
        if step % 5 == 0:
            metrics.log(step, {"epoch": step / 10, "loss": 100.0 / step, "images_per_s": 50.0})
        else:
            metrics.advance(step)
    metrics.close()
    last = server.posts[-1][2]["trainerStatus"]
    assert last["progressPercentage"] == 100
    assert {"name": "loss", "value": "5"} in last["metrics"]
