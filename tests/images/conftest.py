"""Both images, built by a real container engine from the stand-in bases (tests/images/bases.sh), and the pods'
own commands run in them as the cluster runs them: command, args, env, working directory and user taken from the
rendered manifest, with the environment the training operator injects, on the host network (S3 on loopback).

Skipped, with one line saying why, where no engine answers or the stand-in bases are absent (`make images-ci`
installs and starts one and builds them); a failing build fails."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from containers import CLI_IMAGE, ENGINE, IMAGE, PYTHON_BASE, ROOT, TORCH_BASE, Pods, engine, run_spec, run_two_nodes


@pytest.fixture(scope="session")
def images() -> tuple[str, str]:
    """The training and CLI images of this checkout, built through docker/build.sh (what `make image` runs) from the
    stand-in bases; cached layers make a rebuild of unchanged code take seconds."""
    if not shutil.which(ENGINE):
        pytest.skip(f"image tests: no {ENGINE} here (make images-ci installs Debian's docker.io and starts it)")
    if engine("info", timeout=30).returncode != 0:
        pytest.skip(f"image tests: {ENGINE} is installed but its daemon does not answer (make images-ci starts one)")
    for base in (TORCH_BASE, PYTHON_BASE):
        if engine("image", "inspect", base).returncode != 0:
            pytest.skip(f"image tests: stand-in base {base} absent (make images-ci, or tests/images/bases.sh, builds it)")
    env = {**os.environ, "IMAGE": IMAGE, "CLI_IMAGE": CLI_IMAGE, "BASE_IMAGE": TORCH_BASE,
           "CLI_BASE_IMAGE": PYTHON_BASE, "BUILD_NETWORK": "host"}
    built = subprocess.run([str(ROOT / "docker" / "build.sh")], capture_output=True, text=True, env=env, timeout=1800)
    assert built.returncode == 0, built.stdout + built.stderr
    return IMAGE, CLI_IMAGE

@pytest.fixture
def pods(images):
    p = Pods(images[0])
    yield p
    p.remove_all()

@pytest.fixture(scope="session")
def finished_run(images, s3_server, demo_on_s3) -> dict:
    """The TrainJob's two nodes, run once to the end (test_pods checks the run; the CLI image reads it)."""
    pods = Pods(images[0])
    try:
        return run_two_nodes(pods, s3_server, run_spec(s3_server, demo_on_s3, "two-trainjob", "trainjob"), "trainjob")
    finally:
        pods.remove_all()

@pytest.fixture(scope="session")
def demo_on_s3(s3_server, tmp_path_factory):
    """Part of the demo image set (real JPEGs) once in the session's bucket as shards (a step reads a few objects, not a
    hundred); returns the URL of the folder holding train/ and val/."""
    from barlow import storage
    from barlow.data.demo import write_demo
    from barlow.data.shards import write_shards

    local = tmp_path_factory.mktemp("images-demo")
    write_demo(str(local), size=16)
    for split, keep in (("train", 32), ("val", 8)):  # 320 + 80 images: two containers share a 2-core machine
        for folder in (local / split).iterdir():
            for extra in sorted(folder.iterdir())[keep:]:
                extra.unlink()
    url = f"s3://{s3_server.bucket}/images-demo"
    before = {k: os.environ.get(k) for k in s3_server.env}
    os.environ.update(s3_server.env)
    storage.configure_s3(storage.S3Settings(endpoint_url=s3_server.endpoint_url, retries=10))
    try:
        for split in ("train", "val"):
            write_shards(str(local / split), f"{url}/{split}", shard_size=1 << 20, progress=False)
    finally:
        storage.configure_s3()
        for k, v in before.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return url
