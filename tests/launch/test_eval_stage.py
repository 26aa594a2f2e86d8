"""The pipeline's eval stage: a pretrain spec's `eval.runtime` / `eval.cluster` size the follow-up eval (one node by
default, the rest inherited), the follow-up pod runs the small CLI image, and the rendered eval job is that size."""

from __future__ import annotations

import pytest
import yaml
from cluster_specs import SPECS, TRAINJOB_SPECS

from barlow.launch.manifest import cli_image, to_dict
from barlow.launch.render import build_follow_up, render
from barlow.spec import SpecError, follow_up_eval, parse_spec, set_path

BIG = SPECS["pretrain-4x8gpu"]  # 4 nodes x 8 GPUs, 64 CPUs, 480Gi, 64Gi /dev/shm
CPU = SPECS["pretrain-1node-cpu"]  # 1 node x 2 processes, no GPU, 4 CPUs, 8Gi, 1Gi /dev/shm


def with_eval(base: dict, **overrides) -> dict:
    data = base
    for path, value in overrides.items():
        data = set_path(data, "eval." + path.replace("__", "."), value)
    return data


@pytest.mark.parametrize("data, want", [
    (BIG, (1, 8, 8, "64", "480Gi", "64Gi")),  # nothing set: one node, the rest as pretraining
    (with_eval(BIG, cluster__gpus_per_node=1), (1, 1, 1, "64", "480Gi", "64Gi")),  # processes follow the eval's GPUs
    (with_eval(BIG, runtime__nodes=2, runtime__nproc_per_node=4), (2, 4, 4, "64", "480Gi", "64Gi")),  # GPUs follow them
    (with_eval(BIG, cluster__cpu=16, cluster__memory="64Gi"), (1, 8, 8, "16", "64Gi", "64Gi")),
    (with_eval(BIG, runtime__nproc_per_node=2, cluster__gpus_per_node=2, cluster__shm_size="4Gi"), (1, 2, 2, "64", "480Gi", "4Gi")),
    (CPU, (1, 2, 0, "4", "8Gi", "1Gi")),  # no GPU in pretraining: none in the eval
    (with_eval(CPU, runtime__nproc_per_node=1), (1, 1, 0, "4", "8Gi", "1Gi")),
])
def test_follow_up_eval_takes_its_overrides_and_inherits_the_rest(data, want):
    pretrain = parse_spec(data)
    ev = follow_up_eval(pretrain)
    r, c = ev.runtime, ev.cluster
    assert (r.nodes, r.nproc_per_node, c.gpus_per_node, c.cpu, c.memory, c.shm_size) == want
    # everything else of the placement is the pretrain run's
    assert (r.device, r.precision, c.image, c.node_selector, c.namespace) == (
        pretrain.runtime.device, pretrain.runtime.precision, pretrain.cluster.image, pretrain.cluster.node_selector,
        pretrain.cluster.namespace)
    assert ev.eval.checkpoint == pretrain.output.url


@pytest.mark.parametrize("data, line", [
    (with_eval(BIG, runtime__nodez=2), "eval.runtime.nodez: unknown field (did you mean 'nodes'?)"),
    (with_eval(BIG, cluster__cpu="8x"), "eval.cluster.cpu: '8x' is not a Kubernetes quantity (e.g. 8, 500m, 32Gi)"),
    (with_eval(BIG, runtime__nodes=0), "eval.runtime.nodes: Input should be greater than or equal to 1"),
    (with_eval(BIG, cluster__gpus=1), "eval.cluster.gpus: unknown field (did you mean 'gpus_per_node'?)"),
    # an eval spec is sized by its own top-level runtime and cluster
    (set_path(SPECS["eval"], "eval.runtime", {"nodes": 2}), "eval.runtime: unknown field (did you mean 'runtime'?)"),
])
def test_bad_eval_overrides_are_one_line_naming_the_field(data, line):
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert err.value.problems == [line]


@pytest.mark.parametrize("data, problem", [
    (with_eval(BIG, runtime__nodes=3, runtime__nproc_per_node=1),  # 256 images on 3 processes
     "eval.batch_size: must be divisible by 3 (nodes × nproc_per_node)"),
    (with_eval(BIG, runtime__nproc_per_node=4, cluster__gpus_per_node=8),  # named where the spec sets it
     "eval.cluster.gpus_per_node: must equal runtime.nproc_per_node (4) when GPUs are requested"),
    (with_eval(BIG, runtime__nodes=2, cluster__gpus_per_node=0),
     "eval.cluster.gpus_per_node: must be set when runtime.device is cuda on several nodes"),
])
def test_an_eval_that_does_not_fit_its_overrides_is_refused_before_anything_runs(data, problem):
    pretrain = parse_spec(data)  # pretraining itself is fine
    with pytest.raises(SpecError) as err:
        follow_up_eval(pretrain)
    assert err.value.source == "the follow-up eval"
    assert err.value.problems == [problem]


@pytest.mark.parametrize("specs, key", [(SPECS, "pretrain-4x8gpu"), (TRAINJOB_SPECS, "pretrain-4x8gpu-kueue")])
def test_the_pipelines_eval_renders_as_one_node_by_default(specs, key):
    pretrain = parse_spec(specs[key])
    _, job = render(pretrain, "eval")  # the job after its NetworkPolicy
    if job["kind"] == "PyTorchJob":
        assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}  # no Worker: one pod
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    else:
        assert job["spec"]["trainer"]["numNodes"] == 1
    _, pretrain_job = render(pretrain, "pretrain")
    assert pretrain_job["metadata"]["name"] != job["metadata"]["name"]
    # the follow-up hands this very eval to `barlow submit eval --after`
    (env,) = [e for e in to_dict(build_follow_up(pretrain))["spec"]["template"]["spec"]["containers"][0]["env"]
              if e["name"] == "BARLOW_SPEC"]
    assert parse_spec(yaml.safe_load(env["value"])).runtime.nodes == 1


@pytest.mark.parametrize("image, cli", [
    ("registry.example.com/barlow:0.1.0", "registry.example.com/barlow-cli:0.1.0"),
    ("registry.example.com:5000/team/barlow:v2", "registry.example.com:5000/team/barlow-cli:v2"),  # a port is no tag
    ("registry.example.com:5000/barlow", "registry.example.com:5000/barlow-cli"),
    ("barlow:0.1.0", "barlow-cli:0.1.0"),
    ("registry.example.com/barlow@sha256:" + "0" * 64, "registry.example.com/barlow-cli:{version}"),  # pinned: version
    ("registry.example.com/barlow:0.1.0@sha256:" + "0" * 64, "registry.example.com/barlow-cli:0.1.0"),
])
def test_the_cli_image_defaults_from_the_training_image(image, cli):
    from barlow import __version__

    data = set_path(CPU, "cluster.image", image)
    assert cli_image(parse_spec(data)) == cli.format(version=__version__)
    chosen = parse_spec(set_path(data, "cluster.cli_image", "mirror.example.com/tools/barlow-cli:7"))
    assert cli_image(chosen) == "mirror.example.com/tools/barlow-cli:7"
    follow_up = to_dict(build_follow_up(chosen))["spec"]["template"]["spec"]["containers"][0]
    assert follow_up["image"] == "mirror.example.com/tools/barlow-cli:7"
