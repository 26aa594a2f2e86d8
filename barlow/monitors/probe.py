"""The online linear probe: a classifier on view 1's detached pooled backbone features, trained on each training
batch's labels by its own optimizer (and, with several processes, its own DDP, so its gradients are averaged across
ranks and the backbone's DDP never sees it); its running top-1 is each log line's probe_top1."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from barlow import runsetup
from barlow.data.source import Source
from barlow.errors import UnlabelledData
from barlow.monitors import Monitor, Off
from barlow.spec import PretrainSpec


def build(spec: PretrainSpec, proc: runsetup.RunContext, source: Source, model: nn.Module) -> Monitor | None:
    """monitor.online_probe; unlabelled training data turns it off, and the 'monitor:' line says so."""
    on = probe_enabled(spec.monitor.online_probe, len(source.classes))
    if not source.classes:
        return Off("data.train has no labels: online probe off;")
    if not on:
        return None
    return OnlineProbe(model.backbone.feature_dim, len(source.classes), spec.monitor.probe_lr, proc.place.device,
                       proc.place.world_size)


def probe_enabled(setting: str, num_classes: int) -> bool:
    """monitor.online_probe for data with `num_classes` classes: auto is on when there is more than one."""
    if setting == "on" and num_classes < 2:
        raise UnlabelledData(f"monitor.online_probe: on needs labelled data, data.train has {num_classes} class "
                         f"(use auto or off)")
    return setting == "on" or (setting == "auto" and num_classes > 1)


class OnlineProbe(Monitor):
    """A linear classifier on detached backbone features, trained on each training batch's labels.

    BatchNorm without affine parameters in front of the linear layer (as MAE's linear probe) keeps one learning
    rate right while the backbone's feature scale drifts during pretraining. `top1` counts the predictions made on
    each batch before the probe learns from it, so it measures features the probe has not been fitted to yet.
    """

    name, KEYS, observes, checkpointed = "probe", ("probe_top1",), True, True

    def __init__(self, feature_dim: int, num_classes: int, lr: float, device: torch.device, world_size: int = 1):
        self.num_classes = num_classes
        self.head = nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, num_classes)).to(device)
        # Its own DDP: rank 0's initial weights everywhere, gradients averaged; batch statistics stay per rank.
        self.trained = (DistributedDataParallel(self.head, gradient_as_bucket_view=True, **runsetup.ddp_buffer_sync(False))
                        if world_size > 1 else self.head)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=lr, momentum=0.9)
        self.hits = torch.zeros((), device=device)  # since the last `take`, on the device
        self.seen = torch.zeros((), device=device)

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """One SGD step on a batch; queues device work only (no host sync)."""
        logits = self.trained(features.float())
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.hits += (logits.detach().argmax(dim=1) == labels).sum()
        self.seen += labels.numel()

    def describe(self) -> str:
        return f"online probe on {self.num_classes} classes"

    def observe(self, features: torch.Tensor, labels: torch.Tensor | None) -> None:
        if labels is not None:
            self.step(features, labels)

    def counts(self) -> list[torch.Tensor]:
        """This rank's (correct, predicted) since the last `reset`, still on the device."""
        return [self.hits, self.seen]

    def at_log(self, totals: list[float]) -> dict[str, float]:
        """The top-1 on the batches since the last line, all ranks (nothing before the first batch)."""
        hits, seen = totals
        if seen <= 0:
            return {}
        self.reset()
        return {"probe_top1": 100 * hits / seen}

    def reset(self) -> None:
        self.hits.zero_()
        self.seen.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
