"""eval.mode linear: the linear probe of a frozen backbone."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from barlow.evaluate.backbone import fingerprint
from barlow.evaluate.protocol import HeadProtocol
from barlow.spec import EvalSpec


class LinearProbe(HeadProtocol):
    """The backbone frozen (its weights and its BN statistics: eval mode throughout); only the linear head learns,
    on features computed without a graph."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__(backbone, head)
        backbone.requires_grad_(False)
        self.before = fingerprint(backbone)

    def param_groups(self, e: EvalSpec) -> list[dict[str, Any]]:
        return [{"params": self.head.parameters(), "lr": e.lr_head}]

    def train_mode(self) -> None:
        self.head.train()
        self.backbone.eval()

    def logits(self, forward: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone(x)
        return forward(features)

    def check(self) -> None:
        if fingerprint(self.backbone) != self.before:
            raise RuntimeError("linear eval changed the frozen backbone (a bug: it must stay untouched)")


PROTOCOL = LinearProbe
