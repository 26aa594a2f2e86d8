"""The eval protocols (eval.mode): what each trains, and the promise the linear probe checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from barlow.evaluate import PROTOCOLS, topk_correct
from barlow.evaluate.linear import LinearProbe
from barlow.model import build_backbone
from barlow.spec import EvalSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _step(mode: str):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", small_images=True, width=4)
    head = nn.Linear(backbone.feature_dim, 3)
    protocol = PROTOCOLS[mode](backbone, head)
    e = EvalSpec(mode=mode, lr_head=0.5, lr_backbone=0.0 if mode == "linear" else 0.5, backbone="b.pt")
    optimizer = torch.optim.SGD(protocol.param_groups(e), lr=e.lr_head, momentum=0.9)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    head_before = head.weight.detach().clone()
    protocol.train_mode()
    loss = F.cross_entropy(protocol.logits(protocol.trained, torch.randn(6, 3, 16, 16)), torch.tensor([0, 1, 2] * 2))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, before[k])]
    return protocol, changed, not torch.equal(head.weight, head_before)


@pytest.mark.parametrize("mode, trains_backbone, trained_is", [
    ("linear", False, nn.Linear),
    ("finetune", True, nn.Sequential),
])
def test_each_protocol_trains_what_it_says(mode, trains_backbone, trained_is):
    protocol, backbone_changed, head_changed = _step(mode)
    assert head_changed
    assert bool(backbone_changed) is trains_backbone  # weights and BN running statistics alike
    assert isinstance(protocol.trained, trained_is)
    protocol.check()


def test_the_linear_probe_catches_a_changed_backbone():
    protocol, _, _ = _step("linear")
    assert isinstance(protocol, LinearProbe)
    with torch.no_grad():
        next(protocol.backbone.parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="changed the frozen backbone"):
        protocol.check()


def test_every_eval_mode_has_a_protocol():
    assert set(PROTOCOLS) == set(EvalSpec.model_fields["mode"].annotation.__args__)


@pytest.mark.parametrize("logits, labels, hits", [
    ([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]], [1, 1], [1, 2]),
    ([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15]], [2, 2], [0, 1]),
])
def test_topk_correct(logits, labels, hits):
    assert [int(h) for h in topk_correct(torch.tensor(logits), torch.tensor(labels), (1, 2))] == hits


# ---- which encoder an eval builds: the pretraining's run record, unless the spec says otherwise ----------------
TINY = {"arch": "resnet18", "projector": "64-64", "small_images": True, "width": 8}


def _pretrain_output(tmp_path, model: dict | None = TINY) -> str:
    """An output folder as a pretraining leaves it: a checkpoint whose run record names its model."""
    from barlow import checkpoint
    from barlow.model import BarlowTwins

    out = str(tmp_path / "pretrain")
    net = BarlowTwins(TINY["arch"], TINY["projector"], TINY["small_images"], TINY["width"])
    run = {"batch_size": 128, "world_size": 1} | ({"model": model} if model else {})
    checkpoint.save(out, 4, {"model": net.state_dict(), "step": 4, "run": run}, keep=1)
    torch.save({k.removeprefix("backbone."): v for k, v in net.state_dict().items() if k.startswith("backbone.")},
               tmp_path / "pretrain" / "backbone.pt")
    return out


def _eval_spec(model: dict | None = None, **source) -> object:
    from barlow.spec import parse_spec

    return parse_spec({"kind": "eval", "name": "ev", "data": {"train": "d/train", "val": "d/val"},
                       "output": {"url": "out"}, "eval": source, **({"model": model} if model else {})})


@pytest.mark.parametrize("source", ["checkpoint", "checkpoint-folder", "backbone"])
def test_an_eval_without_model_takes_the_pretrainings(tmp_path, source):
    from barlow.evaluate import eval_model

    out = _pretrain_output(tmp_path)
    where = {"checkpoint": {"checkpoint": out}, "checkpoint-folder": {"checkpoint": f"{out}/checkpoints/step-00000004"},
             "backbone": {"backbone": f"{out}/backbone.pt"}}[source]
    model = eval_model(_eval_spec(**where))
    assert model.model_dump() == {**TINY}


def test_an_export_without_a_record_beside_it_takes_the_defaults(tmp_path):
    from barlow.evaluate import eval_model

    (tmp_path / "b.pt").write_bytes(b"")
    assert eval_model(_eval_spec(backbone=str(tmp_path / "b.pt"))).arch == "resnet50"


def test_a_model_that_differs_from_the_record_is_one_line(tmp_path):
    from barlow.errors import BackboneMismatch
    from barlow.evaluate import eval_model

    out = _pretrain_output(tmp_path)
    assert eval_model(_eval_spec(model=TINY, checkpoint=out)).width == 8  # the same: fine
    with pytest.raises(BackboneMismatch) as e:
        eval_model(_eval_spec(model={"arch": "resnet18", "small_images": True}, checkpoint=out))
    assert str(e.value) == ("eval: the spec's model.width 64 (the checkpoint's: 8) does not match the pretraining's "
                            "run record: leave model out of an eval spec to take the checkpoint's")


def test_weights_of_another_shape_are_one_line_not_a_size_mismatch_traceback():
    from barlow.errors import BackboneMismatch
    from barlow.evaluate import load_backbone
    from barlow.spec import ModelSpec

    weights = build_backbone("resnet18", small_images=True, width=8).state_dict()
    model = ModelSpec(arch="resnet18", width=16, small_images=True)
    with pytest.raises(BackboneMismatch) as e:
        load_backbone(build_backbone("resnet18", small_images=True, width=16), weights, model)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("eval: the backbone does not match model.* (resnet18, width 16, small_images True): ")
    assert "e.g. conv1.weight is [8, 3, 3, 3] in the weights, [16, 3, 3, 3] for model.*" in str(e.value)
