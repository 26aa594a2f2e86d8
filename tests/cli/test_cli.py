"""The command line: every bad input is one `error:` line and a non-zero exit with nothing written; `--set`, `init`,
`-h`/`--version`, the namespace order, and the one handler for what no command expected (`--debug` shows it)."""

from __future__ import annotations

import os
import re

import pytest
import s3fs
import yaml
from fake_kube import FakeKube
from typer.testing import CliRunner

from barlow import __version__
from barlow.cli import app
from barlow.cli.starter import starter_text
from barlow.errors import EXIT_FAILED, EXIT_INVALID_SPEC
from barlow.spec import load_spec, loads_spec

SPEC = {
    "kind": "pretrain", "name": "demo",
    "data": {"train": "s3://bucket/train", "val": "s3://bucket/val"},
    "output": {"url": "s3://bucket/runs/demo"},
    "runtime": {"nproc_per_node": 2},
    "optim": {"batch_size": 64, "epochs": 10, "warmup_epochs": 1},
    "cluster": {"gpus_per_node": 2, "image": "registry.example.com/barlow:0.1.0"},
}
SPEC_TEXT = yaml.safe_dump(SPEC, sort_keys=False)


def barlow(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0][len("error: "):]


@pytest.fixture
def hermetic(tmp_path, monkeypatch):
    """No kubeconfig, no namespace or spec from the environment, no S3 credentials; runs in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    for var in ("KUBERNETES_SERVICE_HOST", "BARLOW_NAMESPACE", "BARLOW_SPEC", "BARLOW_DEBUG", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would still hold another test's credentials
    (tmp_path / "spec.yaml").write_text(SPEC_TEXT)
    yield tmp_path
    s3fs.S3FileSystem.clear_instance_cache()  # nor may a credential-less client serve the tests after this one


def files_under(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def line_of(text: str, line: str) -> int:
    return text.splitlines().index(line) + 1


OPTIM_LINE, EPOCHS_LINE, LAST_LINE = line_of(SPEC_TEXT, "optim:"), line_of(SPEC_TEXT, "  epochs: 10"), SPEC_TEXT.count("\n")

# (id, file to write as spec.yaml: text or bytes (None: SPEC), command line, exit code, fragment of the one line)
BAD_INPUTS = [
    ("duplicate-section", SPEC_TEXT + "optim:\n  epochs: 3\n", ["validate", "spec.yaml"], 2,
     f"spec.yaml: line {LAST_LINE + 1}: duplicate key 'optim' (first at line {OPTIM_LINE})"),
    ("duplicate-field", SPEC_TEXT.replace("  epochs: 10\n", "  epochs: 10\n  epochs: 20\n"), ["validate", "spec.yaml"], 2,
     f"spec.yaml: line {EPOCHS_LINE + 1}: duplicate key 'optim.epochs' (first at line {EPOCHS_LINE})"),
    ("latin-1", "# café\n".encode("latin-1") + SPEC_TEXT.encode(), ["validate", "spec.yaml"], 2,
     "spec.yaml: not UTF-8 text (byte 0xe9 at offset 5); save the spec as UTF-8"),
    ("utf-16", SPEC_TEXT.encode("utf-16"), ["validate", "spec.yaml"], 2, "spec.yaml: not UTF-8 text (byte 0xff at offset 0)"),
    ("folder", None, ["validate", "."], 2, ".: is a folder, not a spec file"),
    ("set-unknown", None, ["validate", "spec.yaml", "--set", "data.batch_size=4"], 2,
     "data.batch_size: unknown field (did you mean 'optim.batch_size'?) (from --set data.batch_size=4)"),
    ("set-no-equals", None, ["validate", "spec.yaml", "--set", "optim.epochs"], 2,
     "--set optim.epochs: must be key.path=value"),
    ("set-empty-part", None, ["validate", "spec.yaml", "--set", "optim..epochs=3"], 2, "must be key.path=value"),
    ("set-bad-yaml", None, ["validate", "spec.yaml", "--set", "data.augment.blur_prob=[1.0"], 2,
     "--set data.augment.blur_prob: line 1: not valid YAML"),
    ("set-through-a-value", None, ["validate", "spec.yaml", "--set", "name.first=x"], 2,
     "--set name.first=x: name: is a value, not a section (it has no field 'first')"),
    ("set-out-of-range", None, ["run", "pretrain", "spec.yaml", "--set", "optim.epochs=0"], 2,
     "optim.epochs: Input should be greater than or equal to 1 (from --set optim.epochs=0)"),
    ("set-rule", None, ["render", "pretrain", "spec.yaml", "--set", "cluster.gpus_per_node=4"], 2,
     "cluster.gpus_per_node: must equal runtime.nproc_per_node (2) when GPUs are requested (from --set cluster.gpus_per_node=4)"),
    ("set-plan", None, ["plan", "spec.yaml", "--images", "1000", "--set", "optim.batch_sise=8"], 2,
     "optim.batch_sise: unknown field (did you mean 'batch_size'?)"),
    ("set-submit", None, ["submit", "pretrain", "spec.yaml", "--set", "cluster.namespace=Bad_NS"], 2,
     "cluster.namespace: 'Bad_NS' is not a valid Kubernetes name"),
    ("namespace-option", None, ["render", "pretrain", "spec.yaml", "-n", "Bad_NS"], 2,
     "--namespace: 'Bad_NS' is not a valid Kubernetes name"),
    ("spec-env-duplicate", None, ["submit", "eval"], 2, "BARLOW_SPEC: line 2: duplicate key 'kind' (first at line 1)"),
    ("spec-env-field", None, ["submit", "eval"], 2, "BARLOW_SPEC: kind: must be 'pretrain' or 'eval' (got 'train')"),
    ("namespace-env", None, ["status", "demo"], 2, "BARLOW_NAMESPACE: 'Team_A' is not a valid Kubernetes name"),
    ("demo-no-credentials", None, ["data", "demo", "s3://bucket/demo"], 1,
     "s3://bucket/demo: cannot write the demo set (s3://bucket/demo/train: no S3 credentials found"),
    ("shard-gs", None, ["data", "shard", ".", "gs://bucket/shards"], 2,
     "DST gs://bucket/shards: unsupported URL scheme 'gs://' (use a local path or one of: file://, memory://, s3://)"),
    ("demo-az", None, ["data", "demo", "az://container/demo"], 2, "DST az://container/demo: unsupported URL scheme 'az://'"),
    ("kubeconfig-not-yaml", None, ["status", "demo"], 1, "kubeconfig {kubeconfig}: not valid YAML (line 5: expected the node content"),
    ("kubeconfig-not-a-mapping", None, ["list", "-n", "vision"], 1, "kubeconfig {kubeconfig}: not a kubeconfig"),
    ("init-exists", None, ["init", "spec.yaml"], 2, "spec.yaml: already exists; pass --force to overwrite it"),
    ("demo-not-empty", None, ["data", "demo", "."], 2, "DST .: not empty (1 entries, e.g. spec.yaml) and no demo set: "
     "choose a new or empty folder, or pass --force"),
    ("demo-mistyped-url", None, ["data", "demo", "s3:/bucket/demo"], 2, "DST s3:/bucket/demo: 's3:/bucket/demo' is "
     "neither a URL nor a plain path: write s3://bucket/demo"),
]
KUBECONFIGS = {"kubeconfig-not-yaml": "apiVersion: v1\nclusters:\n- name: x\n  cluster: {server: [\n",
               "kubeconfig-not-a-mapping": "just a line of text\n"}


@pytest.mark.parametrize("case_id, content, args, code, fragment", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(hermetic, monkeypatch, case_id, content, args, code, fragment):
    if content is not None:
        (hermetic / "spec.yaml").write_bytes(content if isinstance(content, bytes) else content.encode())
    kubeconfig = hermetic / "kubeconfig"
    if case_id.startswith("spec-env"):
        monkeypatch.setenv("BARLOW_SPEC", "kind: eval\nkind: eval\n" if case_id.endswith("duplicate") else "kind: train\n")
    if case_id == "namespace-env":
        monkeypatch.setenv("BARLOW_NAMESPACE", "Team_A")
    if case_id in KUBECONFIGS:
        kubeconfig.write_text(KUBECONFIGS[case_id])
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    before = {p: (hermetic / p).read_bytes() for p in files_under(hermetic)}
    result = barlow(*args)
    assert result.exit_code == code, (result.exit_code, result.output)
    line = one_error_line(result)
    assert fragment.format(kubeconfig=kubeconfig) in line and not re.match(r"^(\S+): \1: ", line), line  # no doubled prefix
    assert result.stdout == ""
    assert {p: (hermetic / p).read_bytes() for p in files_under(hermetic)} == before  # nothing written or changed


def test_demo_writes_into_a_new_folder_or_with_force_and_a_rerun_does_nothing(hermetic):
    first = barlow("data", "demo", "new", "--size", "8")
    assert first.exit_code == 0 and "wrote 1433 train and 364 val images" in first.stdout, first.output
    again = barlow("data", "demo", "new")
    assert again.exit_code == 0 and again.stdout.strip() == "new: demo set already there, nothing to do"
    forced = barlow("data", "demo", ".", "--size", "8", "--force")
    assert forced.exit_code == 0 and (hermetic / "spec.yaml").exists() and (hermetic / "val" / "9").is_dir()


def test_bad_inputs_cover_the_listed_tracebacks():
    ids = {c[0] for c in BAD_INPUTS}
    assert {"duplicate-section", "latin-1", "utf-16", "demo-no-credentials", "shard-gs", "kubeconfig-not-yaml"} <= ids


@pytest.mark.parametrize("command", ["validate", "run", "render", "submit", "plan"])
def test_every_spec_command_takes_set(hermetic, command):
    """The same bad --set is refused the same way by each command that reads a spec, before anything else."""
    args = {"run": ["run", "pretrain"], "render": ["render", "pretrain"], "submit": ["submit", "pretrain"]}.get(command, [command])
    result = barlow(*args, "spec.yaml", "--set", "optim.epochs=3", "--set", "runtime.nproc_per_nodes=2")
    assert result.exit_code == EXIT_INVALID_SPEC
    assert one_error_line(result) == ("runtime.nproc_per_nodes: unknown field (did you mean 'nproc_per_node'?) "
                                      "(from --set runtime.nproc_per_nodes=2)")


@pytest.mark.parametrize("sets, path, value", [
    (["optim.epochs=30"], ("optim", "epochs"), 30),
    (["optim.epochs=30", "optim.epochs=40"], ("optim", "epochs"), 40),  # the last one wins, as on any command line
    (["data.augment.blur_prob=[0.5, 0.2]"], ("data", "augment", "blur_prob"), [0.5, 0.2]),
    (["model.small_images=true"], ("model", "small_images"), True),
    (["cluster.memory=64Gi"], ("cluster", "memory"), "64Gi"),
    (["cluster.cpu=16"], ("cluster", "cpu"), "16"),
    (["name=other-run"], ("name",), "other-run"),
    (["data.val="], ("data", "val"), None),  # empty: null, as in a YAML file
])
def test_validate_applies_set_like_the_file(hermetic, sets, path, value):
    result = barlow("validate", "spec.yaml", *[a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    for key in path:
        resolved = resolved[key]
    assert resolved == value
    assert "optim.epochs" in str(sets) or yaml.safe_load(result.stdout)["optim"]["epochs"] == 10


def test_render_applies_set(hermetic):
    result = barlow("render", "pretrain", "spec.yaml", "--set", "cluster.image=registry.example.com/barlow:9.9")
    assert result.exit_code == 0, result.output
    assert "image: registry.example.com/barlow:9.9" in result.stdout and "barlow:0.1.0" not in result.stdout


@pytest.mark.parametrize("cluster", [False, True], ids=["local", "cluster"])
def test_init_writes_a_starter_that_validates_as_written(hermetic, cluster):
    result = barlow("init", "new.yaml", *(["--cluster"] if cluster else []))
    assert result.exit_code == 0, result.output
    text = (hermetic / "new.yaml").read_text()
    assert text == starter_text(cluster) and text.count("#") >= 10  # commented
    spec = load_spec(hermetic / "new.yaml")
    if cluster:
        assert (spec.runtime.device, spec.cluster.gpus_per_node, spec.runtime.nproc_per_node) == ("cuda", 8, 8)
        assert spec.output.url.startswith("s3://") and spec.cluster.image
        assert barlow("render", "pipeline", "new.yaml").exit_code == 0
    else:
        assert spec.runtime.device == "cpu" and spec.data.train == "data/demo/train"
    assert barlow("validate", "new.yaml").exit_code == 0


def test_init_overwrites_only_with_force(hermetic):
    (hermetic / "mine.yaml").write_text("kind: pretrain\n")
    assert barlow("init", "mine.yaml").exit_code == 2
    assert (hermetic / "mine.yaml").read_text() == "kind: pretrain\n"
    assert barlow("init", "mine.yaml", "--force", "--cluster").exit_code == 0
    assert (hermetic / "mine.yaml").read_text() == starter_text(True)
    loads_spec((hermetic / "mine.yaml").read_text())


def _commands(group=None, prefix=()):
    import typer

    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name)


COMMANDS = list(_commands())


def test_every_command_is_listed():
    assert {("init",), ("validate",), ("status",), ("wait",), ("data", "demo"), ("data", "shard")} <= set(COMMANDS)


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_has_help_with_an_example(command, flag):
    result = CliRunner().invoke(app, [*command, flag], prog_name="barlow", terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"Usage: barlow {' '.join(command)} " in result.stdout
    assert "Example" in result.stdout and f"barlow {' '.join(command)}" in result.stdout.split("Example", 1)[1]
    usage = result.stdout.split(f"Usage: barlow {' '.join(command)} ", 1)[1].splitlines()[0].split()
    assert usage[0] == "[OPTIONS]" and all(re.fullmatch(r"\{[A-Z]+\}|\[[A-Z]+\]", arg) for arg in usage[1:]), usage


def test_top_level_help_and_version():
    assert "Usage: barlow [OPTIONS] COMMAND" in CliRunner().invoke(app, ["-h"], prog_name="barlow").stdout
    for args in (["--version"], ["version"]):
        result = barlow(*args)
        assert (result.exit_code, result.stdout) == (0, f"barlow {__version__}\n")


def _boom(*args, **kwargs):
    raise KeyError("no such thing")


@pytest.mark.parametrize("debug", ["", "--debug", "BARLOW_DEBUG=1", "BARLOW_DEBUG=true"])
def test_unexpected_errors_are_one_line_unless_debugging(hermetic, monkeypatch, debug):
    monkeypatch.setattr("barlow.spec.dump_spec", _boom)
    env = dict([debug.split("=")]) if "=" in debug else None
    result = barlow(*([debug] if debug.startswith("--") else []), "validate", "spec.yaml", env=env)
    if debug:
        assert isinstance(result.exception, KeyError)  # the traceback is Python's own
        return
    assert result.exit_code == EXIT_FAILED
    line = one_error_line(result)
    assert line.startswith("barlow validate failed: KeyError: 'no such thing' at barlow/cli/__init__.py:")
    assert "in validate()" in line and "--debug" in line and "BARLOW_DEBUG=1" in line


# (id, --namespace, $BARLOW_NAMESPACE, the spec's cluster.namespace, the kubeconfig context's, expected)
NAMESPACES = [
    ("option-first", "opt", "env", "spec", "ctx", "opt"),
    ("env-next", None, "env", "spec", "ctx", "env"),
    ("spec-next", None, None, "spec", "ctx", "spec"),
    ("context-next", None, None, None, "ctx", "ctx"),
    ("default-last", None, None, None, None, "barlow"),
]


@pytest.fixture
def kube(hermetic, monkeypatch):
    with FakeKube() as fake:
        yield fake


def _kubeconfig_with_namespace(fake: FakeKube, path, namespace: str | None):
    fake.kubeconfig(path)
    config = yaml.safe_load(path.read_text())
    if namespace:
        config["contexts"][0]["context"]["namespace"] = namespace
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("case_id, option, env, in_spec, in_context, expected", NAMESPACES, ids=[n[0] for n in NAMESPACES])
@pytest.mark.parametrize("command", ["render", "submit", "status", "wait", "delete", "list"])
def test_namespace_order_is_the_same_for_every_command(kube, hermetic, monkeypatch, command, case_id, option, env,
                                                       in_spec, in_context, expected):
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig_with_namespace(kube, hermetic / "kubeconfig", in_context)))
    if env:
        monkeypatch.setenv("BARLOW_NAMESPACE", env)
    spec = {**SPEC, "cluster": {**SPEC["cluster"], **({"namespace": in_spec} if in_spec else {})}}
    (hermetic / "spec.yaml").write_text(yaml.safe_dump(spec))
    spec_commands = {"render": ["render", "pretrain", "spec.yaml"], "submit": ["submit", "pretrain", "spec.yaml", "--dry-run"]}
    args = spec_commands.get(command, [command, *([] if command == "list" else ["demo"])])
    result = barlow(*args, *(["-n", option] if option else []), *(["--timeout", "0"] if command == "wait" else []))
    if command == "render":
        assert result.exit_code == 0, result.output
        assert {d["metadata"]["namespace"] for d in yaml.safe_load_all(result.stdout)} == {expected}
        return
    if command not in spec_commands:
        expected = option or env or in_context or "barlow"  # no spec: the next in line
    assert kube.requests, result.output
    assert all(f"/namespaces/{expected}/" in r.path for r in kube.requests if "/namespaces/" in r.path), \
        [r.path for r in kube.requests]


def test_a_rule_with_several_problems_is_one_error_line_each(hermetic):
    result = barlow("validate", "spec.yaml", "--set", "runtime.nproc_per_node=3")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == EXIT_INVALID_SPEC and len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert {line.split(": ")[1] for line in lines} == {"cluster.gpus_per_node", "optim.batch_size"}
