"""Shared test fixtures. The tests mirror the packages (tests/data/, tests/launch/, ...; the house modules' own at the
top); the helpers and oracles they share are in tests/support/, on sys.path through pyproject's pytest pythonpath."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
import torch

# ---- S3 (data plane): one real SeaweedFS server on 127.0.0.1 per test session ---------------------------------
from s3server import ACCESS_KEY, SECRET_KEY, S3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A running `weed mini` (S3 on a free loopback port); stopped by its process id at the end, also on failure."""
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class S3Place:
    server: S3Server
    url: str  # s3://bucket/<unique prefix>, empty at the start of the test
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    @property
    def settings(self):
        """The settings a run builds from its spec's data.s3 and passes to every storage call."""
        from barlow import storage

        return storage.S3Settings(endpoint_url=self.server.endpoint_url, retries=10)


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch):
    """This test's own prefix on the session's server, with credentials in the environment; `settings` reach it
    explicitly (as a run's storage calls do), and the process default of barlow.storage (what the CLI's data tools
    use) points at it too."""
    from barlow import storage

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    storage.configure_s3(storage.S3Settings(endpoint_url=s3_server.endpoint_url, retries=10))
    yield S3Place(s3_server, f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:12]}")
    storage.configure_s3()


# ---- end S3 --------------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """One intra-op thread: a shared 2-core machine crawls when tiny tensor ops spread over threads.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def kube(tmp_path, monkeypatch):
    """A fake Kubernetes API server (tests/support/fake_kube.py) that the kubernetes client reaches through KUBECONFIG, with
    the variables that would point barlow elsewhere removed."""
    from fake_kube import FakeKube

    with FakeKube() as fake:
        monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "kubeconfig")))
        for var in ("KUBERNETES_SERVICE_HOST", "BARLOW_SPEC", "BARLOW_NAMESPACE", "BARLOW_BACKEND"):
            monkeypatch.delenv(var, raising=False)
        yield fake
