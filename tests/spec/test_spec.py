"""Run specs: good ones resolve, bad ones are rejected with one line per problem naming the field, exit code 2."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from barlow.cli import app
from barlow.spec import REMOVE, EvalRunSpec, PretrainSpec, SpecError, dump_spec, json_schema, load_spec, loads_spec, parse_spec, set_path

ROOT = Path(__file__).resolve().parents[2]

GOOD = {
    "kind": "pretrain",
    "name": "demo",
    "data": {"train": "data/train", "val": "data/val"},
    "output": {"url": "runs/demo"},
}
GOOD_EVAL = {
    "kind": "eval",
    "name": "demo-eval",
    "data": {"train": "data/train", "val": "data/val"},
    "output": {"url": "runs/demo/eval"},
    "eval": {"checkpoint": "runs/demo"},
}


def with_(base: dict, path: str, value) -> dict:
    """A copy of `base` with the dotted `path` set to `value` (or removed, for value=DELETE)."""
    return set_path(base, path, value)


DELETE = REMOVE

# (id, spec, the field path the message must start with, a fragment of the message)
BAD = [
    ("typo-top", with_(GOOD, "optimm", {}), "optimm", "unknown field (did you mean 'optim'?)"),
    ("typo-data", with_(GOOD, "data.trian", "x"), "data.trian", "did you mean 'train'"),
    ("typo-nested", with_(GOOD, "data.augment.blur_probb", [1, 0]), "data.augment.blur_probb", "unknown field"),
    ("typo-runtime", with_(GOOD, "runtime.nproc", 2), "runtime.nproc", "did you mean 'nproc_per_node'"),
    ("missing-kind", with_(GOOD, "kind", DELETE), "kind", "required"),
    ("bad-kind", with_(GOOD, "kind", "pretrian"), "kind", "must be 'pretrain' or 'eval'"),
    ("missing-name", with_(GOOD, "name", DELETE), "name", "required"),
    ("bad-name-upper", with_(GOOD, "name", "MyRun"), "name", "DNS-1035"),
    ("bad-name-digit", with_(GOOD, "name", "1run"), "name", "DNS-1035"),
    ("name-too-long", with_(GOOD, "name", "a" * 60), "name", "at most 50"),
    ("missing-data", with_(GOOD, "data", DELETE), "data", "required"),
    ("missing-train", with_(GOOD, "data.train", DELETE), "data.train", "required"),
    ("missing-output", with_(GOOD, "output", DELETE), "output", "required"),
    ("empty-train", with_(GOOD, "data.train", ""), "data.train", "at least 1"),
    ("ftp-url", with_(GOOD, "data.train", "ftp://host/x"), "data.train", "unsupported URL scheme 'ftp://'"),
    ("s3-no-bucket", with_(GOOD, "output.url", "s3://"), "output.url", "no bucket"),
    ("http-output", with_(GOOD, "output.url", "https://host/x"), "output.url", "unsupported URL scheme"),
    ("bad-format", with_(GOOD, "data.format", "tfrecord"), "data.format", "'imagefolder', 'shards', 'webdataset' or 'parquet'"),
    ("shards-not-json", with_(GOOD, "data.format", "shards"), "data.train", "index .json"),
    ("size-string", with_(GOOD, "data.image_size", "big"), "data.image_size", "valid integer"),
    ("size-too-small", with_(GOOD, "data.image_size", 4), "data.image_size", "greater than or equal to 8"),
    ("channels-2", with_(GOOD, "data.channels", 2), "data.channels", "1 or 3"),
    ("workers-negative", with_(GOOD, "data.workers", -1), "data.workers", "greater than or equal to 0"),
    ("blur-prob-range", with_(GOOD, "data.augment.blur_prob", [1.5, 0.1]), "data.augment.blur_prob", "between 0 and 1"),
    ("blur-prob-arity", with_(GOOD, "data.augment.blur_prob", [1.0]), "data.augment.blur_prob", "must have 2 values"),
    ("min-scale-zero", with_(GOOD, "data.augment.min_scale", 0), "data.augment.min_scale", "greater than 0"),
    ("endpoint-no-scheme", with_(GOOD, "data.s3", {"endpoint_url": "minio:9000"}), "data.s3.endpoint_url", "http://"),
    ("endpoint-creds", with_(GOOD, "data.s3", {"endpoint_url": "http://key:secret@minio:9000"}),
     "data.s3.endpoint_url", "must not contain credentials"),
    ("bad-arch", with_(GOOD, "model.arch", "vit_b_16"), "model.arch", "resnet50"),
    ("bad-projector", with_(GOOD, "model.projector", "8192x8192"), "model.projector", "widths joined by '-'"),
    ("projector-zero", with_(GOOD, "model.projector", "8192-0"), "model.projector", "widths joined by '-'"),
    ("width-too-small", with_(GOOD, "model.width", 2), "model.width", "greater than or equal to 4"),
    ("epochs-zero", with_(GOOD, "optim.epochs", 0), "optim.epochs", "greater than or equal to 1"),
    ("lr-negative", with_(GOOD, "optim.lr_weights", -0.1), "optim.lr_weights", "greater than 0"),
    ("momentum-one", with_(GOOD, "optim.momentum", 1.0), "optim.momentum", "less than 1"),
    ("lars-eta-zero", with_(GOOD, "optim.lars_eta", 0.0), "optim.lars_eta", "greater than 0"),
    ("lars-eta-big", with_(GOOD, "optim.lars_eta", 2.0), "optim.lars_eta", "less than or equal to 1"),
    ("lambd-string", with_(GOOD, "optim.lambd", "small"), "optim.lambd", "valid number"),
    ("warmup-too-long", with_(with_(GOOD, "optim.epochs", 5), "optim.warmup_epochs", 5), "optim.warmup_epochs",
     "must be shorter than optim.epochs (5)"),
    ("batch-not-divisible", with_(GOOD, "runtime.nproc_per_node", 3), "optim.batch_size",
     "must be divisible by 3 (nodes × nproc_per_node)"),
    ("batch-not-divisible-nodes", with_(with_(GOOD, "runtime.nodes", 4), "runtime.nproc_per_node", 3),
     "optim.batch_size", "must be divisible by 12"),
    ("nodes-zero", with_(GOOD, "runtime.nodes", 0), "runtime.nodes", "greater than or equal to 1"),
    ("bad-device", with_(GOOD, "runtime.device", "tpu"), "runtime.device", "'auto', 'cpu' or 'cuda'"),
    ("bad-precision", with_(GOOD, "runtime.precision", "fp16"), "runtime.precision", "'auto', 'fp32' or 'bf16'"),
    ("bad-decode", with_(GOOD, "data.decode", "npu"), "data.decode", "'auto', 'cpu' or 'gpu'"),
    ("gpu-decode-on-cpu", with_(with_(GOOD, "data.decode", "gpu"), "runtime.device", "cpu"), "data.decode",
     "gpu needs a CUDA device"),
    ("checkpoint-every-zero", with_(GOOD, "output.checkpoint_every", 0), "output.checkpoint_every", "greater than or equal to 1"),
    ("keep-zero", with_(GOOD, "output.keep", 0), "output.keep", "greater than or equal to 1"),
    ("pretrain-with-eval-source", with_(GOOD, "eval.checkpoint", "runs/x"), "eval.checkpoint", "set by the pipeline"),
    ("gpus-mismatch", with_(with_(GOOD, "cluster.gpus_per_node", 8), "runtime.nproc_per_node", 4), "cluster.gpus_per_node",
     "must equal runtime.nproc_per_node (4)"),
    ("bad-memory", with_(GOOD, "cluster.memory", "lots"), "cluster.memory", "not a Kubernetes quantity"),
    ("bad-namespace", with_(GOOD, "cluster.namespace", "My_NS"), "cluster.namespace", "not a valid Kubernetes name"),
    ("bad-pull-policy", with_(GOOD, "cluster.image_pull_policy", "always"), "cluster.image_pull_policy", "'Always'"),
    ("eval-no-source", with_(GOOD_EVAL, "eval.checkpoint", DELETE), "eval.checkpoint", "needs eval.checkpoint or eval.backbone"),
    ("eval-both-sources", with_(GOOD_EVAL, "eval.backbone", "runs/demo/backbone.pt"), "eval.backbone", "not both"),
    ("eval-no-val", with_(GOOD_EVAL, "data.val", DELETE), "data.val", "needs validation images"),
    ("eval-percent", with_(GOOD_EVAL, "eval.train_percent", 50), "eval.train_percent", "100, 10 or 1"),
    ("eval-linear-backbone-lr", with_(GOOD_EVAL, "eval.lr_backbone", 0.01), "eval.lr_backbone", "must be 0 in linear mode"),
    ("eval-batch-divisible", with_(GOOD_EVAL, "runtime.nproc_per_node", 3), "eval.batch_size", "must be divisible by 3"),
    ("eval-optim-section", with_(GOOD_EVAL, "optim", {}), "optim", "unknown field"),
    ("eval-checkpoint-a-backbone", with_(GOOD_EVAL, "eval.checkpoint", "runs/x/backbone.pt"), "eval.checkpoint",
     "'runs/x/backbone.pt' is a file: an exported backbone goes in eval.backbone"),
    ("eval-model-typo", with_(GOOD_EVAL, "model.widht", 8), "model.widht", "did you mean 'width'"),
    ("cross-section-data", with_(GOOD, "data.batch_size", 4), "data.batch_size", "did you mean 'optim.batch_size'"),
    ("cross-section-optim", with_(GOOD, "optim.image_size", 64), "optim.image_size", "did you mean 'data.image_size'"),
    ("cross-section-top", with_(GOOD, "epochs", 4), "epochs", "did you mean 'optim.epochs'"),
    ("s3-one-slash", with_(GOOD, "output.url", "s3:/bucket/x"), "output.url",
     "'s3:/bucket/x' is neither a URL nor a plain path: write s3://bucket/x"),
    ("s3-no-slash", with_(GOOD, "data.train", "s3:bucket/train"), "data.train", "write s3://bucket/train"),
    ("s3-no-colon", with_(GOOD, "data.val", "s3//bucket/val"), "data.val", "write s3://bucket/val"),
    ("file-one-slash", with_(GOOD, "output.url", "file:/runs/x"), "output.url", "write file:///runs/x"),
    ("https-one-slash", with_(GOOD_EVAL, "eval.backbone", "https:/host/b.pt"), "eval.backbone", "write https://host/b.pt"),
    ("gs-one-slash", with_(GOOD, "output.url", "gs:/bucket/x"), "output.url", "write gs://bucket/x"),
    ("bucket-with-space", with_(GOOD, "output.url", "s3://my bucket/x"), "output.url", "white space in its bucket"),
    ("gs-not-served", with_(GOOD, "data.train", "gs://bucket/train"), "data.train", "unsupported URL scheme 'gs://'"),
    ("az-output", with_(GOOD, "output.url", "az://container/run"), "output.url", "unsupported URL scheme 'az://'"),
]


@pytest.mark.parametrize("url", ["./s3:/bucket/x", "runs/s3/x", "/abs/s3:/x", "s3://bucket/with space/x", "file:///tmp/x"])
def test_paths_that_only_contain_a_scheme_name_are_fine(url):
    assert parse_spec(with_(GOOD, "output.url", url)).output.url == url


def test_good_specs_resolve_with_paper_defaults():
    spec = parse_spec(GOOD)
    assert isinstance(spec, PretrainSpec)
    assert (spec.model.arch, spec.model.projector, spec.optim.batch_size) == ("resnet50", "8192-8192-8192", 2048)
    assert (spec.optim.lr_weights, spec.optim.lr_biases, spec.optim.lambd, spec.optim.warmup_epochs) == (0.2, 0.0048, 5e-3, 10)
    assert isinstance(parse_spec(GOOD_EVAL), EvalRunSpec)


@pytest.mark.parametrize("case_id, data, field, fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_spec_names_the_field(case_id, data, field, fragment):
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    lines = info.value.problems
    assert any(line.startswith(f"{field}: ") and fragment in line for line in lines), lines
    assert all("\n" not in line for line in lines)


def test_enough_distinct_bad_specs():
    assert len({b[0] for b in BAD}) >= 30


@pytest.mark.parametrize("case_id, data, field, fragment", BAD[::6], ids=[b[0] for b in BAD[::6]])
def test_cli_validate_rejects_with_exit_code_2(tmp_path, case_id, data, field, fragment):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines)
    assert any(line.startswith(f"error: {field}: ") for line in lines), lines


@pytest.mark.parametrize("text, fragment", [
    ("kind: pretrain\nname: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "must be a mapping"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, text, fragment):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert len(info.value.problems) == 1 and str(path) in info.value.problems[0] and fragment in info.value.problems[0]


def test_missing_file_names_it(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml: no such file" in result.stderr


def test_validate_prints_the_resolved_spec_which_round_trips(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0
    resolved = yaml.safe_load(result.stdout)
    assert resolved["optim"]["batch_size"] == 2048 and resolved["data"]["augment"]["blur_prob"] == [1.0, 0.1]
    assert parse_spec(resolved) == parse_spec(GOOD)
    assert yaml.safe_load(dump_spec(parse_spec(resolved))) == resolved


def test_pipeline_eval_reads_the_pretrain_output():
    ev = parse_spec(GOOD).eval_spec()
    assert ev.kind == "eval" and ev.eval.checkpoint == "runs/demo" and ev.output.url == "runs/demo/eval"
    assert ev.model == parse_spec(GOOD).model


def test_spec_hash_is_stable_and_sensitive():
    assert parse_spec(GOOD).spec_hash() == parse_spec(copy.deepcopy(GOOD)).spec_hash()
    assert parse_spec(GOOD).spec_hash() != parse_spec(with_(GOOD, "optim.epochs", 20)).spec_hash()


def test_schema_command_prints_a_schema_that_documents_every_field():
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema == json.loads(json.dumps(json_schema()))
    defs = schema["$defs"]
    for name, model in defs.items():
        for field, prop in model.get("properties", {}).items():
            if field != "kind":
                assert prop.get("description"), f"{name}.{field} has no description"
    assert defs["OptimSpec"]["additionalProperties"] is False


def test_examples_validate():
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        load_spec(path)


def test_root_cli_entry_runs():
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("barlow ")


@pytest.mark.parametrize("text, problem", [
    ("kind: pretrain\nkind: eval\n", "line 2: duplicate key 'kind' (first at line 1)"),
    ("kind: pretrain\noptim: {epochs: 3}\nname: x\noptim:\n  lr_weights: 0.1\n", "line 4: duplicate key 'optim' (first at line 2)"),
    ("kind: pretrain\ndata:\n  train: a\n  augment:\n    blur_prob: [1, 0]\n    blur_prob: [0, 1]\n",
     "line 6: duplicate key 'data.augment.blur_prob' (first at line 5)"),
    ("kind: pretrain\ncluster:\n  tolerations:\n    - {key: a, key: b}\n", "line 4: duplicate key 'cluster.tolerations.0.key' (first at line 4)"),
    ("kind: pretrain\n'1': a\n1: b\n\"1\": c\n", "line 4: duplicate key '1' (first at line 2)"),  # quoting does not make it another key
])
def test_duplicate_keys_are_refused_with_their_line(text, problem):
    with pytest.raises(SpecError) as info:
        loads_spec(text, "spec.yaml")
    assert info.value.problems == [f"spec.yaml: {problem}; a key may appear once"]


def test_anchors_aliases_and_merge_keys_are_not_duplicates():
    text = yaml.safe_dump(GOOD) + "x-defaults: &d {epochs: 5, warmup_epochs: 1}\noptim:\n  <<: *d\n  epochs: 6\n"
    with pytest.raises(SpecError) as info:  # x-defaults is unknown; the merge key and its override are no duplicate
        loads_spec(text, "spec.yaml")
    assert info.value.problems == ["x-defaults: unknown field"]


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16", "utf-16-le", "cp1252"])
def test_a_spec_not_in_utf8_is_one_line(tmp_path, encoding):
    path = tmp_path / "spec.yaml"
    path.write_bytes(("# déjà vu\n" + yaml.safe_dump(GOOD)).encode(encoding))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (line,) = info.value.problems
    assert line.startswith(f"{path}: not UTF-8 text (byte 0x") and line.endswith("save the spec as UTF-8")


def test_a_utf8_spec_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(("# déjà vu\n" + yaml.safe_dump(GOOD)).encode("utf-8-sig"))
    assert load_spec(path) == parse_spec(GOOD)


@pytest.mark.parametrize("sets, problem", [
    (["optim.epochs"], "--set optim.epochs: must be key.path=value (e.g. --set optim.epochs=100)"),
    (["=3"], "--set =3: must be key.path=value"),
    (["optim.=3"], "--set optim.=3: must be key.path=value"),
    (["name.x=1"], "--set name.x=1: name: is a value, not a section (it has no field 'x')"),
    (["optim.epochs={a"], "--set optim.epochs: line 1: not valid YAML"),
    (["optim.epochs=ten"], "optim.epochs: Input should be a valid integer, unable to parse string as an integer "
                            "(from --set optim.epochs=ten)"),
    (["optim.batch_size=100", "runtime.nproc_per_node=3"],
     "optim.batch_size: must be divisible by 3 (nodes × nproc_per_node) (from --set optim.batch_size=100)"),
    (["data.batch_size=4"], "data.batch_size: unknown field (did you mean 'optim.batch_size'?) (from --set data.batch_size=4)"),
    (["optimm.epochs=4"], "optimm: unknown field (did you mean 'optim'?)"),
])
def test_bad_overrides_name_the_key_path(sets, problem):
    with pytest.raises(SpecError) as info:
        loads_spec(yaml.safe_dump(GOOD), "spec.yaml", sets)
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(problem), info.value.problems


def test_overrides_resolve_like_the_file():
    text = yaml.safe_dump(GOOD)
    sets = ["optim.epochs=30", "data.augment.blur_prob=[0.5, 0.2]", "eval.epochs=7", "cluster.cpu=16", "data.val="]
    as_file = copy.deepcopy(GOOD)
    as_file["optim"] = {"epochs": 30}
    as_file["data"] = {**GOOD["data"], "augment": {"blur_prob": [0.5, 0.2]}, "val": None}
    as_file["eval"], as_file["cluster"] = {"epochs": 7}, {"cpu": 16}
    assert loads_spec(text, "spec.yaml", sets) == parse_spec(as_file)


def test_starter_specs_validate_as_written():
    from barlow.cli.starter import starter_text

    assert loads_spec(starter_text(False)).runtime.device == "cpu"
    assert loads_spec(starter_text(True)).cluster.gpus_per_node == 8


def test_eval_data_names_the_labelled_set_of_the_follow_up_eval():
    from barlow.spec import stage_runs

    spec = parse_spec(with_(with_(GOOD, "data.labels", "none"), "eval.data",
                            {"train": "s3://b/labelled/train", "val": "s3://b/labelled/val"}))
    _, ev = stage_runs(spec, "pipeline")
    assert (ev.data.train, ev.data.val, ev.data.format, ev.data.labels) == (
        "s3://b/labelled/train", "s3://b/labelled/val", "imagefolder", "auto")
    assert ev.data.image_size == spec.data.image_size  # the rest of data.* is the pretraining's
    with pytest.raises(SpecError, match="eval.data: the pretraining data has no labels .data.labels is none.; "):
        stage_runs(parse_spec(with_(GOOD, "data.labels", "none")), "pipeline")
    assert len(stage_runs(parse_spec(with_(GOOD, "data.labels", "none")), "pretrain")) == 1


@pytest.mark.parametrize("mlflow", [None, {"tracking_uri": "http://mlflow.example:5000", "experiment": "team-a"}])
def test_the_follow_up_eval_logs_where_its_pretraining_logs(mlflow):
    """output.mlflow reaches the pipeline's eval (both stages log to the same tracker; the eval as its own run)."""
    from barlow.spec import stage_runs

    spec = parse_spec(with_(GOOD, "output.mlflow", mlflow))
    _, ev = stage_runs(spec, "pipeline")
    assert ev.output.mlflow == spec.output.mlflow and ev.output.url == f"{spec.output.url}/eval"
