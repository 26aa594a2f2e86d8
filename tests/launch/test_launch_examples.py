"""Every example renders for both backends (pretrain, eval, pipeline as its kind allows) and the job validates against
its real CRD, strictly; `barlow plan` prints every example."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml
from cluster_specs import strict_schema
from typer.testing import CliRunner

from barlow.cli import app
from barlow.launch.render import render
from barlow.spec import load_spec, with_fields

pytestmark = pytest.mark.filterwarnings("ignore::barlow.launch.checks.ClusterWarning")  # a queued example as a PyTorchJob
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
# The cluster examples (they name an image); the others are local runs, which a cluster refuses (last test).
CLUSTER_EXAMPLES = [p for p in EXAMPLES if load_spec(p).cluster.image]
CRDS = {"PyTorchJob": ("kubeflow.org_pytorchjobs.yaml", "v1"), "TrainJob": ("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1")}


@pytest.fixture(scope="module")
def validators():
    out = {}
    for kind, (name, version) in CRDS.items():
        path = ROOT.parent / "shared" / "schemas" / name
        if not path.exists():
            pytest.skip(f"{path} not found: CRD check skipped")
        (v,) = [v for v in yaml.safe_load(path.read_text())["spec"]["versions"] if v["name"] == version]
        schema = strict_schema(v["schema"]["openAPIV3Schema"])
        out[kind] = jsonschema.validators.validator_for(schema)(schema)
    return out


def as_backend(path: Path, backend: str):
    spec = load_spec(path)
    changes = {"cluster.backend": backend}
    if backend == "trainjob":  # a TrainJob cannot set these: its runtime decides them
        changes.update({f"cluster.{f}": None for f in ("priority_class", "image_pull_policy", "backoff_limit",
                                                         "clean_pod_policy")})
    return with_fields(spec, changes, str(path))


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
@pytest.mark.parametrize("path", CLUSTER_EXAMPLES, ids=[p.stem for p in CLUSTER_EXAMPLES])
def test_every_cluster_example_renders_for_both_backends(validators, path, backend):
    spec = as_backend(path, backend)
    for what in (["pretrain", "eval", "pipeline"] if spec.kind == "pretrain" else ["eval"]):
        docs = render(spec, what)
        job = docs[1]  # after its NetworkPolicy
        assert job["kind"] == {"pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}[backend]
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[job["kind"]].iter_errors(job)]
        assert errors == [], (what, errors)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_plan_prints_every_example(path):
    result = CliRunner().invoke(app, ["plan", str(path), "--images", "1281167"])
    assert result.exit_code == 0, result.stderr
    assert "global batch:" in result.stdout and "total steps:" in result.stdout


def test_the_local_quickstart_is_refused_on_a_cluster_with_each_reason():
    result = CliRunner().invoke(app, ["render", "pretrain", str(ROOT / "examples" / "quickstart.yaml")])
    assert result.exit_code == 2 and result.stdout == ""
    assert [line.split(":", 2)[1].strip() for line in result.stderr.splitlines()] == [
        "data.train", "data.val", "output.url", "cluster.gpus_per_node"]


def test_the_readmes_minimal_spec_is_a_gpu_spec_that_renders(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = text.split("a minimal spec for a\nGPU cluster", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "minimal.yaml"
    path.write_text(block)
    result = CliRunner().invoke(app, ["render", "pretrain", str(path)])
    assert result.exit_code == 0, result.stderr
    policy, job = yaml.safe_load_all(result.stdout)
    assert policy["kind"] == "NetworkPolicy"
    assert job["kind"] == "TrainJob" and job["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
