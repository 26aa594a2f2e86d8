"""The online probe and the kNN monitor: they learn on the demo digits, never touch the backbone, resume, log, and
average the probe's gradients over ranks (2 gloo processes)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from s3server import free_ports

from barlow import checkpoint
from barlow.data.demo import write_demo
from barlow.errors import UnlabelledData
from barlow.monitors import epoch_due as knn_due
from barlow.monitors.knn import smallest_subset
from barlow.monitors.probe import OnlineProbe, probe_enabled
from barlow.spec import SpecError, parse_spec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo(str(root), size=16)
    return root


def spec_of(demo, out, **monitor) -> dict:
    """One CPU process, a narrow ResNet-18 at 16 px: seconds an epoch."""
    return {"kind": "pretrain", "name": "mon",
            "data": {"train": str(demo / "train"), "val": str(demo / "val"), "image_size": 16, "workers": 0},
            "model": {"arch": "resnet18", "small_images": True, "width": 8, "projector": "128-128-128"},
            "optim": {"epochs": 2, "batch_size": 128, "warmup_epochs": 1},
            "runtime": {"device": "cpu", "log_every": 5, "seed": 7},
            "monitor": {"knn_every_epochs": 0, **monitor},
            "output": {"url": str(out), "checkpoint_every": 1000}}


def rows_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("setting, classes, on", [("auto", 10, True), ("auto", 1, False), ("off", 10, False), ("on", 2, True)])
def test_probe_is_on_by_default_for_labelled_data(setting, classes, on):
    assert probe_enabled(setting, classes) is on


def test_probe_on_without_labels_names_the_field():
    with pytest.raises(UnlabelledData, match=r"^monitor.online_probe: on needs labelled data, data.train has 1 class"):
        probe_enabled("on", 1)


@pytest.mark.parametrize("step, every, due", [
    (10, 1, True), (20, 1, True), (15, 1, False),  # 10 steps an epoch
    (10, 2, False), (20, 2, True), (40, 2, True),
    (35, 100, True),  # the last step always measures
    (30, 100, False),
])
def test_knn_runs_every_n_epochs_and_at_the_end(step, every, due):
    assert knn_due(step, steps_per_epoch=10, total_steps=35, every=every) is due


@pytest.mark.parametrize("images, percent", [(1, 1), (10, 1), (11, 10), (141, 10), (142, 100), (10**6, 100)])
def test_knn_subset_is_the_smallest_that_holds_enough(demo, images, percent):
    from barlow.data import open_source
    from barlow.spec import DataSpec

    src = open_source(DataSpec(train=str(demo / "train")), "train")
    assert [src.count(p) for p in (1, 10, 100)] == [10, 141, 1433]  # the table above is built on these sizes
    assert smallest_subset(src, images) == percent


@pytest.mark.parametrize("monitor, data_val, error", [
    ({"knn_every_epochs": 5}, None, "monitor.knn_every_epochs: the kNN measures on data.val: set data.val (or monitor.data), or 0 to turn it off"),
    ({"online_probe": "yes"}, "v", "monitor.online_probe: Input should be 'auto', 'on' or 'off'"),
    ({"knn_every": 5}, "v", "monitor.knn_every: unknown field (did you mean 'knn_every_epochs'?)"),
    ({"probe_lr": 0}, "v", "monitor.probe_lr: Input should be greater than 0"),
    ({"knn_k": 0}, "v", "monitor.knn_k: Input should be greater than or equal to 1"),
])
def test_bad_monitor_specs_name_the_field(tmp_path, monitor, data_val, error):
    spec = spec_of(tmp_path, tmp_path / "out")
    spec["monitor"] = monitor
    spec["data"]["val"] = data_val
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    assert e.value.problems == [error]


@pytest.mark.parametrize("text, expected", [("off", "off"), ("on", "on"), ("'off'", "off"), ("auto", "auto")])
def test_online_probe_takes_a_bare_yaml_on_or_off(tmp_path, text, expected):
    """YAML 1.1 reads a bare on/off as a boolean: the spec file and --set both mean the word."""
    spec = spec_of(tmp_path, tmp_path / "out")
    spec["monitor"] = yaml.safe_load(f"online_probe: {text}")
    assert parse_spec(spec).monitor.online_probe == expected


@pytest.mark.parametrize("every, has_val, expected", [(None, True, 10), (None, False, 0), (0, True, 0), (3, True, 3)])
def test_knn_every_defaults_to_ten_epochs_with_validation_images(tmp_path, every, has_val, expected):
    spec = spec_of(tmp_path, tmp_path / "out", knn_every_epochs=every)
    if not has_val:
        del spec["data"]["val"]
    assert parse_spec(spec).monitor.knn_every(has_val) == expected


def _step_twice(demo, out, probe: str) -> tuple[dict, dict]:
    """Two train steps on the same two batches; returns the gradients after the second and the weights after it."""
    from barlow.train import device_batches, set_up, train_step

    run = set_up(parse_spec(spec_of(demo, out, online_probe=probe)))
    try:
        batches = device_batches(run.spec, run.source, run.place, 0, run.steps_per_epoch)
        for _, b in zip(range(2), batches, strict=False):
            train_step(run, b.x1, b.x2, b.labels)
        grads = {k: p.grad.clone() for k, p in run.model.named_parameters()}
        weights = {k: v.clone() for k, v in run.model.state_dict().items()}
        if probe == "on":
            assert run.monitor("probe").seen.item() == 2 * 128 and any(p.abs().sum() > 0 for p in run.monitor("probe").head.parameters())
        return grads, weights
    finally:
        run.metrics.close()


def test_probe_cannot_change_the_backbones_weights_or_gradients(demo, tmp_path):
    grads_off, weights_off = _step_twice(demo, tmp_path / "off", "off")
    grads_on, weights_on = _step_twice(demo, tmp_path / "on", "on")
    assert grads_off.keys() == grads_on.keys() and weights_off.keys() == weights_on.keys()
    for k in grads_off:
        assert torch.equal(grads_off[k], grads_on[k]), f"gradient of {k} differs with the probe"
    for k in weights_off:
        assert torch.equal(weights_off[k], weights_on[k]), f"{k} differs with the probe"


def test_probe_state_resumes_with_the_checkpoint(demo, tmp_path):
    from barlow.train import device_batches, set_up, train_step

    out = tmp_path / "out"
    run = set_up(parse_spec(spec_of(demo, out, online_probe="on")))
    b = next(iter(device_batches(run.spec, run.source, run.place, 0, run.steps_per_epoch)))
    train_step(run, b.x1, b.x2, b.labels)
    run.position.step = 1
    run.checkpointer.save(1, wait=True)
    saved = run.monitor("probe").state_dict()
    run.metrics.close()
    assert "probe" in checkpoint.load(checkpoint.latest(str(out)))  # loads with weights_only=True

    resumed = set_up(parse_spec(spec_of(demo, out, online_probe="on")))
    try:
        assert resumed.position.step == 1
        now = resumed.monitor("probe").state_dict()
        for k, v in saved["head"].items():
            assert torch.equal(v, now["head"][k]), k
        momentum = [s["momentum_buffer"] for s in now["optimizer"]["state"].values()]
        assert momentum and all(torch.equal(a, b["momentum_buffer"]) for a, b in
                                zip(momentum, saved["optimizer"]["state"].values(), strict=True))
    finally:
        resumed.metrics.close()


@pytest.mark.slow
def test_probe_learns_and_knn_logs_on_demo_data(demo, tmp_path):
    """Five epochs of pretraining: the probe's running top-1 ends well above chance (10 %); the kNN logs its top-1
    every 2 epochs and at the end, the rank monitor every epoch, to metrics.jsonl and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from barlow.train import pretrain

    out = tmp_path / "out"
    spec = spec_of(demo, out, knn_every_epochs=2, knn_images=300, knn_train_images=1000, rank_every_epochs=1)
    spec["optim"]["epochs"] = 5
    spec["data"]["augment"] = {"min_scale": 0.5}  # crops of 8 % of a 16 px digit leave little to classify
    pretrain(parse_spec(spec))
    rows = rows_of(out)
    probe = [r["probe_top1"] for r in rows if "probe_top1" in r]
    assert len(probe) >= 10 and sum(probe[-3:]) / 3 > 25.0, probe
    assert sum(probe[-3:]) > sum(probe[:3]), probe  # it learns as it goes
    knn = {r["step"]: r["knn_top1"] for r in rows if "knn_top1" in r}
    steps_per_epoch = 1433 // 128
    assert sorted(knn) == [2 * steps_per_epoch, 4 * steps_per_epoch, 5 * steps_per_epoch], knn
    assert all(v > 30.0 for v in knn.values()), knn
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"probe_top1", "knn_top1", "loss", "rankme_features", "rankme_projector", "constant_dims"} <= set(
        events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("knn_top1")] == sorted(knn)
    ranked = [r for r in rows if "rankme_projector" in r]  # the rank monitor: every epoch, as asked
    assert [r["step"] for r in ranked] == [e * steps_per_epoch for e in range(1, 6)]
    assert all(r["rankme_projector"] > r["collapse_below"] for r in ranked), ranked  # a healthy run: no collapse


def _probe_rank(rank: int, world: int, port: int, features: torch.Tensor, labels: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initial weights: DDP must start every rank from rank 0's
        probe = OnlineProbe(features.shape[1], 3, lr=0.5, device=torch.device("cpu"), world_size=world)
        half = len(labels) // world
        for _ in range(3):
            probe.step(features[rank * half:(rank + 1) * half], labels[rank * half:(rank + 1) * half])
        torch.save(probe.head.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_probe_gradients_are_averaged_over_two_gloo_ranks(tmp_path):
    torch.manual_seed(0)
    features, labels = torch.randn(16, 6), torch.randint(0, 3, (16,))
    mp.spawn(_probe_rank, args=(2, free_ports(1)[0], features, labels, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # One process doing what DDP promises: rank 0's start, each rank's half through its own BatchNorm, mean gradient.
    torch.manual_seed(0)
    heads = [OnlineProbe(6, 3, lr=0.5, device=torch.device("cpu")) for _ in range(2)]
    torch.manual_seed(0)
    start = OnlineProbe(6, 3, lr=0.5, device=torch.device("cpu")).head.state_dict()
    for h in heads:
        h.head.load_state_dict(start)
    for _ in range(3):
        for r, h in enumerate(heads):
            h.optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(h.head(features[8 * r:8 * (r + 1)]), labels[8 * r:8 * (r + 1)]).backward()
        for params in zip(*(h.head.parameters() for h in heads), strict=True):
            mean = sum(p.grad for p in params) / 2
            for p in params:
                p.grad = mean.clone()
        for h in heads:
            h.optimizer.step()
    expected = heads[0].head.state_dict()
    for k in ("1.weight", "1.bias"):
        assert torch.equal(ranks[0][k], ranks[1][k]), f"{k} differs between ranks"
        torch.testing.assert_close(ranks[0][k], expected[k], rtol=1e-5, atol=1e-6, msg=f"{k} is not the mean-gradient step")


def low_rank(n: int, d: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g) @ torch.randn(r, d, generator=g)


@pytest.mark.parametrize("name, z, lo, hi, constant", [
    ("collapsed", torch.ones(256, 64) * 3.0, 0.99, 1.01, 1.0),  # every embedding the same: one direction
    ("all zero", torch.zeros(256, 64), 0.0, 0.0, 1.0),
    ("low rank", low_rank(256, 64, 4), 2.0, 4.0, 0.0),
    ("half the dims dead", torch.cat([torch.randn(512, 32), torch.zeros(512, 32)], dim=1), 25.0, 32.0, 0.5),
    ("healthy", torch.randn(512, 64, generator=torch.Generator().manual_seed(1)), 0.85 * 64, 64.0, 0.0),
])
def test_rankme_and_constant_dims(name, z, lo, hi, constant):
    from barlow.monitors.rank import constant_fraction, rankme

    assert lo <= rankme(z) <= hi, name
    assert constant_fraction(z) == pytest.approx(constant)


@pytest.mark.parametrize("setting, images, every", [
    (None, 1_281_167, 1), (None, 1433, 6), (None, 160, 17), (None, 100, 17), (3, 1433, 3), (0, 1433, 0)])
def test_rank_monitor_cadence_keeps_its_cost_within_one_percent(tmp_path, setting, images, every):
    from barlow.spec import MonitorSpec

    assert MonitorSpec(rank_every_epochs=setting).rank_every(images) == every
