"""The eval protocols (eval.mode): what each trains, and the promise the linear probe checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from barlow.evaluate import PROTOCOLS, LinearProbe, topk_correct
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
