"""The CLI image (no torch), as uid 1000: version, validate and render of every example (the same manifests as
this checkout renders), `barlow status` of a run folder on S3, and the pipeline's follow-up
`barlow submit eval --after` against the fake API server, reached from inside the container."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from containers import ENGINE, ROOT, engine
from fake_kube import FakeKube
from typer.testing import CliRunner

from barlow import __version__
from barlow.cli import app
from barlow.launch.render import render
from barlow.spec import dump_spec, parse_spec

pytestmark = pytest.mark.slow
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def cli(image: str, *args: str, env: dict[str, str] | None = None, mounts: dict[Path, str] | None = None):
    cmd = [ENGINE, "run", "--rm", "--network", "host", "--user", "1000:1000", "--cap-drop", "ALL", "--read-only",
           "--tmpfs", "/tmp", "--tmpfs", "/home/barlow:uid=1000,gid=1000"]
    for host, inside in (mounts or {}).items():
        cmd += ["-v", f"{host}:{inside}:ro"]
    for k in env or {}:
        cmd += ["-e", k]
    return subprocess.run([*cmd, image, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def host_barlow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "barlow.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_version_as_uid_1000_without_torch(images):
    out = cli(images[1], "version")
    assert out.returncode == 0 and __version__ in out.stdout, out.stderr
    probe = engine("run", "--rm", "--entrypoint", "python", images[1], "-c",
                   "import importlib.util as u, os; print(os.getuid(), u.find_spec('torch') is None)")
    assert probe.stdout.split() == ["1000", "True"], probe.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_validate_and_render_every_example(images, example):
    """In the image as in this checkout: the same output, the same code (the local quickstart's render is refused
    with the same lines)."""
    spec = yaml.safe_load(example.read_text())
    stage = "eval" if spec.get("kind") == "eval" else "pipeline"
    for args in (["validate", f"/examples/{example.name}"], ["render", stage, f"/examples/{example.name}"]):
        out = cli(images[1], *args, mounts={ROOT / "examples": "/examples"})
        here = host_barlow(*[a.replace("/examples", str(ROOT / "examples")) for a in args])
        theirs = [x.replace(str(ROOT / "examples"), "/examples") for x in (here.stdout, here.stderr)]
        assert (out.returncode, out.stdout, out.stderr) == (here.returncode, *theirs)
        assert out.returncode == 0 or (args[0] == "render" and "cluster" not in spec), out.stderr


def test_status_of_a_run_folder_on_s3(images, s3_server, finished_run):
    out = cli(images[1], "status", finished_run["spec"]["output"]["url"], "-o", "json", env=dict(s3_server.env))
    assert out.returncode == 0, out.stderr
    progress = json.loads(out.stdout)["progress"]
    total = int(re.search(r"(\d+) steps/epoch × (\d+) epochs", finished_run["logs"][0]).group(1)) * 2
    assert (progress["state"], progress["step"], progress["total_steps"]) == ("finished", total, total), progress
    assert isinstance(progress["loss"], float), progress


def test_the_follow_up_pod_submits_the_eval(images, tmp_path, monkeypatch):
    spec = {"kind": "pretrain", "name": "demo", "data": {"train": "s3://bucket/train", "val": "s3://bucket/val"},
            "output": {"url": "s3://bucket/runs/demo"}, "runtime": {"nodes": 2, "nproc_per_node": 4},
            "optim": {"batch_size": 256, "epochs": 10, "warmup_epochs": 1},
            "cluster": {"backend": "pytorchjob", "gpus_per_node": 4, "image": "registry.example.com/barlow:0.1.0"}}
    with FakeKube() as kube:
        kubeconfig = kube.kubeconfig(tmp_path / "kubeconfig")
        kubeconfig.chmod(0o644)
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        for var in ("KUBERNETES_SERVICE_HOST", "BARLOW_NAMESPACE"):
            monkeypatch.delenv(var, raising=False)
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        assert CliRunner().invoke(app, ["submit", "pretrain", str(path)]).exit_code == 0
        kube.phases["demo"] = ["Running", "Succeeded"]
        eval_spec = parse_spec(spec).eval_spec()
        out = cli(images[1], "submit", "eval", "--after", "demo", "--poll", "0.01",
                  env={"BARLOW_SPEC": dump_spec(eval_spec), "KUBECONFIG": "/kube/config"},
                  mounts={kubeconfig: "/kube/config"})
        assert out.returncode == 0, out.stderr
        assert "pytorchjob demo-eval in namespace barlow: created" in out.stdout
        assert [p.body for p in kube.calls("POST")[-2:]] == render(eval_spec)
