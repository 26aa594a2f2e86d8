"""The CLI image (docker/Dockerfile.cli): barlow without torch. Its requirements are pyproject's own lines, and the
pipeline's follow-up (`barlow submit eval --after`), render and plan run in a Python where every package the CLI
image lacks fails to import."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from fake_kube import FakeKube
from typer.testing import CliRunner

from barlow.cli import app
from barlow.launch.render import render
from barlow.spec import dump_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
SPEC = {"kind": "pretrain", "name": "demo", "data": {"train": "s3://bucket/train", "val": "s3://bucket/val"},
        "output": {"url": "s3://bucket/runs/demo"}, "runtime": {"nodes": 2, "nproc_per_node": 4},
        "optim": {"batch_size": 256, "epochs": 10, "warmup_epochs": 1},
        "cluster": {"backend": "pytorchjob", "gpus_per_node": 4, "image": "registry.example.com/barlow:0.1.0"}}


def requirements(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def pyproject_dependencies() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


CLI_REQUIREMENTS = requirements((ROOT / "docker" / "cli-requirements.txt").read_text().splitlines())


def dist_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def closure(names: set[str]) -> set[str]:
    """These distributions and everything they require (as installed here), by normalised name."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [dist_name(r) for r in reqs if "extra ==" not in r]
    return seen


def modules_only_in_the_training_image() -> set[str]:
    """Top-level modules of the distributions the training image has and the CLI image does not."""
    training = closure({dist_name(r) for r in pyproject_dependencies()})
    cli = closure({dist_name(r) for r in CLI_REQUIREMENTS})
    owners = metadata.packages_distributions()
    return {module for module, dists in owners.items()
            if not module.startswith("_") and {d.lower().replace("_", "-") for d in dists} <= training - cli}


def test_cli_requirements_are_pyprojects_own_lines_without_torch():
    assert CLI_REQUIREMENTS and set(CLI_REQUIREMENTS) <= set(pyproject_dependencies())
    assert not {"torch", "torchvision"} & {dist_name(r) for r in CLI_REQUIREMENTS}


def test_the_blocked_set_holds_the_training_stack():
    blocked = modules_only_in_the_training_image()
    assert {"torch", "torchvision", "numpy", "PIL"} <= blocked
    # fsspec and s3fs are in the CLI image: `status` and `plan` read a run's folder or a shard index on S3
    assert not {"kubernetes", "pydantic", "typer", "yaml", "kubeflow", "fsspec", "s3fs"} & blocked


BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = set(sys.argv.pop(1).split(","))

    class NotInTheCliImage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (not in the CLI image)", name=name)

    sys.meta_path.insert(0, NotInTheCliImage())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        sys.exit("the blocker let torch through")
    from barlow.cli import main
    sys.argv[0] = "barlow"
    main()
""")


def barlow_without_torch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    blocked = ",".join(sorted(modules_only_in_the_training_image()))
    return subprocess.run([sys.executable, "-c", BLOCKER, blocked, *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_the_blocker_blocks():
    out = subprocess.run([sys.executable, "-c", BLOCKER.replace("from barlow.cli import main", "import numpy"), "numpy"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "No module named 'numpy' (not in the CLI image)" in out.stderr


def test_the_follow_up_runs_without_torch(tmp_path, monkeypatch):
    """What the follow-up pod runs: wait for the pretrain job, then submit the eval, as in the CLI image."""
    with FakeKube() as kube:
        kubeconfig = kube.kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.delenv("BARLOW_NAMESPACE", raising=False)
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(SPEC))
        assert CliRunner().invoke(app, ["submit", "pretrain", str(path)]).exit_code == 0
        kube.phases["demo"] = ["Running", "Succeeded"]
        eval_spec = parse_spec(SPEC).eval_spec()
        out = barlow_without_torch("submit", "eval", "--after", "demo", "--poll", "0.01",
                                   env={"BARLOW_SPEC": dump_spec(eval_spec), "KUBECONFIG": str(kubeconfig)})
        assert out.returncode == 0, out.stderr
        assert "pytorchjob demo-eval in namespace barlow: created" in out.stdout
        assert [p.body for p in kube.calls("POST")[-2:]] == render(eval_spec)  # its policy, then the eval


@pytest.mark.parametrize("args", [["render", "pipeline", "{spec}"], ["plan", "{spec}", "--images", "1000"],
                                  ["validate", "{spec}"], ["--help"]])
def test_cluster_commands_run_without_torch(tmp_path, args):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    out = barlow_without_torch(*[a.format(spec=path) for a in args])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_plan_without_the_training_stack_counts_the_images_of_an_s3_index(tmp_path, s3):
    """The CLI image reads a shard index on S3 (fsspec, s3fs) without torch or numpy."""
    from barlow import storage
    from barlow.data.layout import ShardIndex, ShardInfo

    index = ShardIndex(classes=["a", "b"], shards=[ShardInfo("shard-000000.tar", 700, 1 << 20),
                                                   ShardInfo("shard-000001.tar", 300, 1 << 19)],
                       class_counts=[600, 400], subset_thresholds={}, shuffle_seed=0, shard_size=1 << 20)
    storage.write_text(f"{s3.url}/train/index.json", index.to_json())
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "data": {"format": "shards", "train": f"{s3.url}/train/index.json",
                                                     "val": f"{s3.url}/val/index.json",
                                                     "s3": {"endpoint_url": s3.server.endpoint_url}}}))
    out = barlow_without_torch("plan", str(path))
    assert out.returncode == 0, out.stderr
    images = [line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if line.strip().startswith("images:")]
    assert images and all(i == "1000" for i in images), out.stdout
