"""eval.mode finetune: backbone and head learn together."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from barlow.evaluate.protocol import HeadProtocol
from barlow.spec import EvalSpec


class Finetune(HeadProtocol):
    """Backbone and head learn together, the backbone at eval.lr_backbone."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__(backbone, head)
        self._trained = nn.Sequential(backbone, head)

    @property
    def trained(self) -> nn.Module:
        return self._trained

    def param_groups(self, e: EvalSpec) -> list[dict[str, Any]]:
        return [{"params": self.head.parameters(), "lr": e.lr_head},
                {"params": self.backbone.parameters(), "lr": e.lr_backbone}]

    def train_mode(self) -> None:
        self._trained.train()

    def logits(self, forward: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return forward(x)


PROTOCOL = Finetune
