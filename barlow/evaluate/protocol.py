"""Eval protocols (`eval.mode`): what an evaluation does with the pretrained backbone.

A protocol is an `EvalProtocol` subclass in a module of its own, which names it `PROTOCOL`; `barlow.spec.
EVAL_PROTOCOLS` maps each eval.mode to that module, imported on first use (`PROTOCOLS[mode]`). A protocol that
trains something (`trained`: a classifier head, with or without the backbone) gets eval.epochs of SGD on the
labelled train subset, checkpointed every epoch; one that trains nothing (a kNN-only or nearest-class-mean protocol)
goes straight to measuring. Every evaluation also reports the kNN top-1 of the backbone's features (the loop's).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from barlow import distributed
from barlow.spec import EVAL_PROTOCOLS, EvalSpec

Features = tuple[torch.Tensor, torch.Tensor]  # this rank's share of a split: backbone features (rows) and labels


class EvalProtocol:
    """What an eval.mode does with the backbone: what trains on it, if anything, how, and what it measures."""

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone

    @classmethod
    def build(cls, backbone: nn.Module, num_classes: int) -> EvalProtocol:
        """The protocol for a loaded backbone, already on its device, and `num_classes` classes."""
        return cls(backbone)

    @property
    def trained(self) -> nn.Module | None:
        """What the optimizer updates, DDP wraps and checkpoints hold; None: nothing trains (no epochs, no optimizer)."""
        return None

    def param_groups(self, e: EvalSpec) -> list[dict[str, Any]]:
        """The optimizer's parameter groups, with their lr (a protocol that trains)."""
        raise NotImplementedError

    def train_mode(self) -> None:
        """Put what trains in the mode its training needs (a protocol that trains)."""
        raise NotImplementedError

    def logits(self, forward: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The class scores of a batch, to train on; `forward` is `trained`, wrapped for several processes (a
        protocol that trains)."""
        raise NotImplementedError

    def eval_mode(self) -> None:
        """Put what measures in eval mode."""
        self.backbone.eval()

    def measure(self, val: Features, train: Features, num_classes: int) -> dict[str, float]:
        """The protocol's results in % of the validation images of all ranks (a collective), from the backbone's
        features of this rank's share of the validation images and of the labelled train subset (the latter in the
        kNN's dtype). Nothing beyond the loop's kNN top-1 by default."""
        return {}

    def check(self) -> None:
        """After measuring: raise if the protocol's promise was broken (most promise nothing to check)."""


class HeadProtocol(EvalProtocol):
    """A linear classifier head learns on the backbone's features; measured by its validation top-1 and top-k
    (k = min(5, classes))."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__(backbone)
        self.head = head

    @classmethod
    def build(cls, backbone: nn.Module, num_classes: int) -> EvalProtocol:
        head = nn.Linear(backbone.feature_dim, num_classes).to(next(backbone.parameters()).device)
        head.weight.data.normal_(0, 0.01)
        head.bias.data.zero_()
        return cls(backbone, head)

    @property
    def trained(self) -> nn.Module:
        return self.head

    def eval_mode(self) -> None:
        self.backbone.eval()
        self.head.eval()

    def measure(self, val: Features, train: Features, num_classes: int) -> dict[str, float]:
        feats, labels = val
        k = min(5, num_classes)
        with torch.no_grad():
            hits = topk_correct(self.head(feats.to(self.head.weight.dtype)), labels, (1, k))
        top1, topk, n_val = distributed.all_sum([*hits, len(labels)], feats.device)
        return {"top1": 100 * top1 / n_val, f"top{k}": 100 * topk / n_val}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    """Correct predictions among the top k, for each k (0-d tensors on the logits' device)."""
    top = logits.topk(max(ks), dim=1).indices
    hits = top.eq(labels[:, None])
    return [hits[:, :k].any(dim=1).sum() for k in ks]


class Protocols(Mapping[str, type[EvalProtocol]]):
    """eval.mode -> its protocol class: the `PROTOCOL` of the module barlow.spec.EVAL_PROTOCOLS names, imported on
    first use (protocols need torch; the spec does not)."""

    def __getitem__(self, mode: str) -> type[EvalProtocol]:
        module = EVAL_PROTOCOLS[mode]
        protocol = getattr(importlib.import_module(module), "PROTOCOL", None)
        if not (isinstance(protocol, type) and issubclass(protocol, EvalProtocol)):
            raise TypeError(f"{module}: PROTOCOL must be the EvalProtocol class of eval.mode {mode}")
        return protocol

    def __iter__(self) -> Iterator[str]:
        for mode in EVAL_PROTOCOLS:
            self[mode]  # its module imported and checked
            yield mode

    def __len__(self) -> int:
        return len(EVAL_PROTOCOLS)


PROTOCOLS = Protocols()
