"""Evaluation of a pretrained backbone: linear probe (frozen) or fine-tuning, top-1/top-5, and a kNN monitor.

Resumable: the head (and, when fine-tuning, the backbone), the optimizer, the lr schedule and the data position
are checkpointed under `<output>/checkpoints/` at every epoch's end and on a stop signal, and a rerun continues there.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from barlow import checkpoint, distributed, storage
from barlow.augment import eval_transform, train_transform
from barlow.checkpoint import Checkpointer
from barlow.data import open_source
from barlow.data.cropfirst import ImageTransform
from barlow.errors import BackboneMismatch, NothingToEvaluate, OutputHoldsAnotherRun, SplitsDisagree, StoppedOnSignal, TooFewImages
from barlow.metrics import Metrics
from barlow.model import build_backbone
from barlow.spec import EvalRunSpec


def backbone_state(source_url: str, is_export: bool) -> dict[str, torch.Tensor]:
    """The backbone weights at a URL: an exported backbone.pt, a pretrain output folder, or a checkpoint folder."""
    if not is_export:
        if storage.exists(storage.join(source_url, "backbone.pt")):
            source_url = storage.join(source_url, "backbone.pt")
        else:
            folder = source_url if storage.exists(storage.join(source_url, "state.pt")) else checkpoint.latest(source_url)
            if folder is None:
                raise NothingToEvaluate(f"eval.checkpoint: no backbone.pt and no complete checkpoint under {source_url}")
            model = checkpoint.load(folder)["model"]
            return {k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")}
    if not storage.exists(source_url):
        raise NothingToEvaluate(f"{'eval.backbone' if is_export else 'eval.checkpoint'}: {source_url} does not exist")
    return torch.load(io.BytesIO(storage.read_bytes(source_url)), map_location="cpu", weights_only=True)


def fingerprint(module: nn.Module) -> str:
    """A hash of every parameter and buffer, to prove a frozen backbone stayed frozen."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    top = logits.topk(max(ks), dim=1).indices
    hits = top.eq(labels[:, None])
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


def evaluate(spec: EvalRunSpec, stop_signal: Callable[[], int | None] = lambda: None) -> dict:
    """Train a linear head (or fine-tune) on the train images, then report val top-1/top-5 and kNN top-1."""
    place = distributed.setup(spec.runtime)
    storage.configure_s3(storage.S3Settings(**spec.data.s3.model_dump()))
    torch.manual_seed(spec.runtime.seed)
    e, d = spec.eval, spec.data
    train_src, val_src = open_source(d, "train"), open_source(d, "val")
    if train_src.classes != val_src.classes:
        raise SplitsDisagree("data.val: its classes differ from data.train's")
    num_classes, per_rank = len(train_src.classes), e.batch_size // place.world_size

    backbone = build_backbone(spec.model.arch, spec.model.small_images, spec.model.width, d.channels)
    state = backbone_state(e.backbone or e.checkpoint, is_export=e.backbone is not None)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneMismatch(f"eval: the backbone does not match model.* ({len(missing)} missing, {len(unexpected)} unexpected "
                        f"weights, e.g. {(missing + unexpected)[0]})")
    backbone.to(place.device)
    head = nn.Linear(backbone.feature_dim, num_classes).to(place.device)
    head.weight.data.normal_(0, 0.01)
    head.bias.data.zero_()
    frozen = e.mode == "linear"
    backbone.requires_grad_(not frozen)
    before = fingerprint(backbone) if frozen else None
    groups = [{"params": head.parameters(), "lr": e.lr_head}]
    if not frozen:
        groups.append({"params": backbone.parameters(), "lr": e.lr_backbone})
    optimizer = torch.optim.SGD(groups, lr=e.lr_head, momentum=0.9, weight_decay=e.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, e.epochs)
    trained = nn.Sequential(backbone, head) if not frozen else head
    ddp = DistributedDataParallel(trained, gradient_as_bucket_view=True, static_graph=True) if place.world_size > 1 else trained
    autocast = torch.autocast(place.device.type, dtype=place.autocast_dtype) if place.autocast_dtype else nullcontext()
    position = EvalPosition(device=place.device)
    record = {"mode": e.mode, "train_percent": e.train_percent, "epochs": e.epochs, "batch_size": e.batch_size,
              "source": e.checkpoint or e.backbone, "world_size": place.world_size, "seed": spec.runtime.seed}
    checkpointer = Checkpointer(spec.output.url, every=1, keep=spec.output.keep, is_main=place.is_main, run=record,
                                parts={"trained": trained, "optimizer": optimizer, "schedule": scheduler, "data": position})
    checkpointer.resume(lambda saved, url: _check_same_eval(saved, record, url))
    metrics = Metrics(spec.output.url, place.is_main, e.epochs, position.epoch, title=f"eval ({e.mode})")
    metrics.print(f"eval {spec.name}: {e.mode}, {e.train_percent}% of {train_src.num_samples} train images, "
                  f"{val_src.num_samples} val images, {num_classes} classes, {e.epochs} epochs"
                  f"{f', resuming at epoch {position.epoch} step {position.in_epoch}' if checkpointer.resumed_run else ''}")

    t_train = ImageTransform(train_transform(d.image_size, d.channels), d.channels)
    t_eval = ImageTransform(eval_transform(d.image_size, d.channels), d.channels)
    while position.epoch < e.epochs:
        trained.train()
        backbone.train(not frozen)  # a frozen backbone keeps its BN statistics: eval mode throughout
        batches = train_src.loader(transform=t_train, batch_size=per_rank, rank=place.rank, world_size=place.world_size,
                                   seed=spec.runtime.seed, epoch=position.epoch, start_step=position.in_epoch,
                                   workers=d.workers, subset_percent=e.train_percent)
        for batch in batches:
            x, y = batch.inputs.to(place.device), batch.labels.to(place.device)
            with autocast:
                if frozen:
                    with torch.no_grad():
                        features = backbone(x)
                    logits = ddp(features)
                else:
                    logits = ddp(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            position.loss_sum += loss.detach()  # stays on the device until the epoch's line
            position.in_epoch, position.batches = position.in_epoch + 1, position.batches + 1
            if position.in_epoch % spec.runtime.log_every == 0:
                _stop_if_asked(stop_signal, place, checkpointer, metrics, position)
        if position.in_epoch == 0:
            raise TooFewImages(f"data.train: the {e.train_percent}% subset is smaller than one batch "
                               f"(eval.batch_size = {e.batch_size})")
        scheduler.step()
        mean_loss = float(position.loss_sum) / position.in_epoch  # sync: once an epoch
        position.next_epoch()
        metrics.log(position.epoch, {"epoch": position.epoch, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"]})
        checkpointer.save(position.batches)
        metrics.sync()
        _stop_if_asked(stop_signal, place, checkpointer, metrics, position, saved=True)

    backbone.eval()
    head.eval()
    val_feats, val_labels = features_of(backbone, val_src, t_eval, per_rank, place, autocast, d.workers)
    k = min(5, num_classes)
    top1, top5 = distributed.all_sum(topk_correct(head(val_feats.to(head.weight.dtype)), val_labels, (1, k)), place.device)
    train_feats, train_labels = features_of(backbone, train_src, t_eval, per_rank, place, autocast, d.workers, e.train_percent)
    knn_hits = knn_correct(distributed.gather_rows(train_feats), distributed.gather_rows(train_labels),
                           val_feats, val_labels, e.knn_k, num_classes)
    knn_top1 = distributed.all_sum([knn_hits], place.device)[0]
    if frozen and fingerprint(backbone) != before:
        raise RuntimeError("linear eval changed the frozen backbone (a bug: it must stay untouched)")

    n_val = val_src.num_samples
    results = {"name": spec.name, "mode": e.mode, "train_percent": e.train_percent, "epochs": e.epochs,
               "classes": num_classes, "val_images": n_val, "top1": 100 * top1 / n_val, f"top{k}": 100 * top5 / n_val,
               "knn_top1": 100 * knn_top1 / n_val, "knn_k": e.knn_k, "checkpoint": e.checkpoint or e.backbone}
    if place.is_main:
        storage.write_text(storage.join(spec.output.url, "results.json"), json.dumps(results, indent=2))
    metrics.log(e.epochs, {"top1": results["top1"], f"top{k}": results[f"top{k}"], "knn_top1": results["knn_top1"]})
    metrics.close()
    distributed.barrier()
    return results


@dataclass
class EvalPosition:
    """Where the classifier's training is: epochs done, batches done in the current one and in all, the epoch's loss."""

    device: torch.device
    epoch: int = 0
    in_epoch: int = 0
    batches: int = 0  # numbers the checkpoints, so the newest is always the furthest
    loss_sum: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)

    def next_epoch(self) -> None:
        self.epoch, self.in_epoch = self.epoch + 1, 0
        self.loss_sum.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "in_epoch": self.in_epoch, "batches": self.batches, "loss_sum": self.loss_sum.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.in_epoch, self.batches = int(state["epoch"]), int(state["in_epoch"]), int(state["batches"])
        self.loss_sum = state["loss_sum"].to(self.device)


def _stop_if_asked(stop_signal: Callable[[], int | None], place: distributed.Placement, checkpointer: Checkpointer,
                   metrics: Metrics, position: EvalPosition, saved: bool = False) -> None:
    """Checkpoint (unless just done) and raise when any rank has a stop signal."""
    signum = stop_signal()
    if not distributed.any_rank(signum is not None, place.device):
        return
    if not saved:
        checkpointer.save(position.batches)
        metrics.sync()
    metrics.close()
    raise StoppedOnSignal(signum or 15, f"epoch {position.epoch} step {position.in_epoch}")


def _check_same_eval(saved: dict[str, Any], now: dict[str, Any], url: str) -> None:
    fixed = ("mode", "train_percent", "epochs", "batch_size", "source")
    if any(saved.get(k) != now[k] for k in fixed):
        raise OutputHoldsAnotherRun(f"output.url: {url} holds an evaluation with other eval.* settings "
                                    f"({', '.join(fixed)} must match); use a new output.url")


@torch.no_grad()
def features_of(backbone: nn.Module, source, transform, per_rank: int, place: distributed.Placement, autocast, workers: int,
                subset_percent: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of this rank's share of a source (every image once across ranks)."""
    feats, labels = [], []
    for batch in source.loader(transform=transform, batch_size=per_rank, rank=place.rank, world_size=place.world_size,
                               seed=0, epoch=0, workers=workers, shuffle=False, drop_last=False,
                               subset_percent=subset_percent):
        with autocast:
            feats.append(backbone(batch.inputs.to(place.device)).float())
        labels.append(batch.labels.to(place.device))
    dim = backbone.feature_dim
    return (torch.cat(feats) if feats else torch.zeros(0, dim, device=place.device),
            torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=place.device))


def knn_correct(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor, val_labels: torch.Tensor,
                k: int, num_classes: int, temperature: float = 0.07) -> int:
    """Correct predictions of a weighted kNN vote on cosine similarity (k neighbours, weights exp(sim / T))."""
    if len(val_feats) == 0:
        return 0
    train_feats, val_feats = F.normalize(train_feats, dim=1), F.normalize(val_feats, dim=1)
    hits = 0
    for start in range(0, len(val_feats), 1024):  # chunks keep the similarity matrix small
        sims = val_feats[start:start + 1024] @ train_feats.T
        top_sims, top_idx = sims.topk(min(k, len(train_feats)), dim=1)
        votes = torch.zeros(len(sims), num_classes, device=sims.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sims / temperature).exp())
        hits += int((votes.argmax(dim=1) == val_labels[start:start + 1024]).sum())
    return hits
