"""The kNN room: backbone features of a source and a sharded, weighted kNN vote on them.

Both the eval stage (its final kNN top-1) and the kNN training monitor (barlow.monitors.knn) measure with these.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from barlow import distributed, runsetup


def knn_dtype(device: torch.device) -> torch.dtype:
    """bf16 kNN features on CUDA: 1.28M x 2048 of them are 5 GB, not 10 (float32 on the CPU, where bf16 is slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@torch.no_grad()
def features_of(backbone: nn.Module, source, transform, per_rank: int, proc: runsetup.RunContext, workers: int,
                subset_percent: int = 100, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of this rank's share of a source (every image once across ranks), stored as `dtype`."""
    place = proc.place
    feats, labels = [], []
    for batch in source.loader(transform=transform, batch_size=per_rank, rank=place.rank, world_size=place.world_size,
                               seed=0, epoch=0, workers=workers, shuffle=False, drop_last=False,
                               subset_percent=subset_percent, pin_memory=place.device.type == "cuda"):
        x, y = proc.batch_on_device(batch.inputs, batch.labels)
        with proc.autocast():
            feats.append(backbone(x).to(dtype))
        labels.append(y)
    dim = backbone.feature_dim
    return (torch.cat(feats) if feats else torch.zeros(0, dim, dtype=dtype, device=place.device),
            torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=place.device))


def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor, val_labels: torch.Tensor,
             k: int, num_classes: int, temperature: float = 0.07) -> float:
    """kNN top-1 in % of the validation rows of all ranks (each rank passes its own shard of both sets; with a process
    group this is a collective). See `knn_correct`."""
    hits = knn_correct(train_feats, train_labels, val_feats, val_labels, k, num_classes, temperature)
    total_hits, n_val = distributed.all_sum([hits, len(val_labels)], val_feats.device)
    return 100 * total_hits / n_val if n_val else 0.0


def knn_correct(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor, val_labels: torch.Tensor,
                k: int, num_classes: int, temperature: float = 0.07, chunk: int = 1024) -> int:
    """This rank's correct predictions of a weighted kNN vote (cosine similarity, k neighbours among the train rows of
    all ranks, weights exp(sim / T)).

    Sharded: no rank holds more than its own train rows. The validation rows travel instead, a chunk at a time from
    the rank that holds them; every rank answers with its own top k (similarity and label), and the holder merges
    the world's candidates into the global top k, which the union of per-shard top k always contains. Features may
    be bf16 (similarities are accumulated and compared in float32 either way).
    """
    device, dim = val_feats.device, val_feats.shape[1]
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    train = _normalized(train_feats)
    val = _normalized(val_feats).to(train.dtype)
    val_sizes = distributed.row_counts(len(val), device)
    k = min(k, int(sum(distributed.row_counts(len(train), device))))
    hits = torch.zeros((), dtype=torch.long, device=device)
    if k == 0:
        return 0
    for owner in range(world):
        for start in range(0, val_sizes[owner], chunk):
            n = min(chunk, val_sizes[owner] - start)
            queries = val[start:start + n] if rank == owner else torch.empty(n, dim, dtype=train.dtype, device=device)
            if world > 1:
                dist.broadcast(queries, owner)
            sims = torch.mm(queries, train.T).float()
            local_k = min(k, len(train))
            top_sims, top_idx = sims.topk(local_k, dim=1)
            cand_sims = torch.full((n, k), float("-inf"), device=device)
            cand_labels = torch.zeros((n, k), dtype=torch.long, device=device)
            cand_sims[:, :local_k], cand_labels[:, :local_k] = top_sims, train_labels[top_idx]
            if world > 1:
                cand_sims, cand_labels = (_all_gather_cols(cand_sims), _all_gather_cols(cand_labels))
            if rank != owner:
                continue
            best_sims, best = cand_sims.topk(k, dim=1)
            votes = torch.zeros(n, num_classes, device=device)
            votes.scatter_add_(1, cand_labels.gather(1, best), (best_sims / temperature).exp())
            hits += (votes.argmax(dim=1) == val_labels[start:start + n]).sum()
    return int(hits)  # sync: once, after every chunk


def _normalized(x: torch.Tensor, rows: int = 65536) -> torch.Tensor:
    """Unit-length rows in x's dtype, normalised in float32 a block of rows at a time (no float32 copy of all)."""
    out = torch.empty_like(x)
    for start in range(0, len(x), rows):
        out[start:start + rows] = F.normalize(x[start:start + rows].float(), dim=1).to(x.dtype)
    return out


def _all_gather_cols(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` (same shape on all ranks), side by side along dim 1, in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=1)
