"""Evaluation of a pretrained backbone: linear probe (frozen) or fine-tuning, top-1/top-5, and a kNN monitor."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from barlow import checkpoint, distributed, storage
from barlow.augment import eval_transform, train_transform
from barlow.data import open_source
from barlow.metrics import Metrics
from barlow.model import build_backbone
from barlow.spec import EvalRunSpec
from barlow.train import DataError, Stopped


def backbone_state(source_url: str, is_export: bool) -> dict[str, torch.Tensor]:
    """The backbone weights at a URL: an exported backbone.pt, a pretrain output folder, or a checkpoint folder."""
    if not is_export:
        if storage.exists(storage.join(source_url, "backbone.pt")):
            source_url = storage.join(source_url, "backbone.pt")
        else:
            folder = source_url if storage.exists(storage.join(source_url, "state.pt")) else checkpoint.latest(source_url)
            if folder is None:
                raise DataError(f"eval.checkpoint: no backbone.pt and no complete checkpoint under {source_url}")
            model = checkpoint.load(folder)["model"]
            return {k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")}
    if not storage.exists(source_url):
        raise DataError(f"{'eval.backbone' if is_export else 'eval.checkpoint'}: {source_url} does not exist")
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
        raise DataError("data.val: its classes differ from data.train's")
    num_classes, per_rank = len(train_src.classes), e.batch_size // place.world_size

    backbone = build_backbone(spec.model.arch, spec.model.small_images, spec.model.width, d.channels)
    state = backbone_state(e.backbone or e.checkpoint, is_export=e.backbone is not None)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"eval: the backbone does not match model.* ({len(missing)} missing, {len(unexpected)} unexpected "
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
    ddp = DistributedDataParallel(trained) if place.world_size > 1 else trained
    autocast = torch.autocast(place.device.type, dtype=place.autocast_dtype) if place.autocast_dtype else nullcontext()
    metrics = Metrics(spec.output.url, place.is_main, e.epochs, title=f"eval ({e.mode})")
    metrics.print(f"eval {spec.name}: {e.mode}, {e.train_percent}% of {train_src.num_samples} train images, "
                  f"{val_src.num_samples} val images, {num_classes} classes, {e.epochs} epochs")

    t_train, t_eval = train_transform(d.image_size, d.channels), eval_transform(d.image_size, d.channels)
    for epoch in range(e.epochs):
        trained.train()
        backbone.train(not frozen)  # a frozen backbone keeps its BN statistics: eval mode throughout
        total_loss, steps = 0.0, 0
        for x, y, _ in train_src.loader(transform=t_train, batch_size=per_rank, rank=place.rank, world_size=place.world_size,
                                        seed=spec.runtime.seed, epoch=epoch, workers=d.workers, subset_percent=e.train_percent):
            x, y = x.to(place.device), y.to(place.device)
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
            total_loss, steps = total_loss + loss.item(), steps + 1
        if steps == 0:
            raise DataError(f"data.train: the {e.train_percent}% subset is smaller than one batch (eval.batch_size = {e.batch_size})")
        scheduler.step()
        metrics.log(epoch + 1, {"epoch": epoch + 1, "loss": total_loss / steps, "lr": optimizer.param_groups[0]["lr"]})
        if distributed.any_rank(stop_signal() is not None, place.device):
            metrics.close()
            raise Stopped(stop_signal() or 15, epoch + 1)

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


@torch.no_grad()
def features_of(backbone: nn.Module, source, transform, per_rank: int, place: distributed.Placement, autocast, workers: int,
                subset_percent: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of this rank's share of a source (every image once across ranks)."""
    feats, labels = [], []
    for x, y, _ in source.loader(transform=transform, batch_size=per_rank, rank=place.rank, world_size=place.world_size,
                                 seed=0, epoch=0, workers=workers, shuffle=False, drop_last=False,
                                 subset_percent=subset_percent):
        with autocast:
            feats.append(backbone(x.to(place.device)).float())
        labels.append(y.to(place.device))
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
