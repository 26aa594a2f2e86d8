"""Two NCCL processes with DDP and SyncBatchNorm take the same step as one process on the whole batch.

Needs two CUDA GPUs (skipped otherwise): each rank holds half the batch, BatchNorm is synchronised across ranks (the
paper's global-batch statistics), the loss is the global one, and DDP averages the parameter gradients.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from barlow.loss import BarlowTwinsLoss
from barlow.model import BarlowTwins

WORLD = 2
pytestmark = pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA GPUs")

PATHS = ("direct", "lean", "sharded")
N, SIZE, LAMBD = 32, 32, 5e-3


def model() -> BarlowTwins:
    torch.manual_seed(0)
    return BarlowTwins("resnet18", "256-256", small_images=True, width=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, data: dict, out: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        res = {}
        x1, x2 = (data[k].chunk(WORLD)[rank].cuda(rank) for k in ("x1", "x2"))
        for path in PATHS:
            m = nn.SyncBatchNorm.convert_sync_batchnorm(model()).cuda(rank)
            ddp = DistributedDataParallel(m, device_ids=[rank], gradient_as_bucket_view=True)
            loss = BarlowTwinsLoss(LAMBD, path)(*ddp(x1, x2))
            loss.backward()
            res[path] = {"loss": loss.detach().cpu(), "grads": [p.grad.detach().cpu() for p in m.parameters()],
                         "buffers": [b.detach().cpu() for b in m.buffers()]}
        torch.save(res, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_gpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("nccl")
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(N, 3, SIZE, SIZE, generator=g)
    data = {"x1": x1, "x2": x1 + 0.3 * torch.randn(N, 3, SIZE, SIZE, generator=g)}
    ctx = mp.spawn(_rank_main, args=(_free_port(), data, str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-GPU NCCL run did not finish in 240 s")
    return data, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("path", PATHS)
def test_two_gpus_take_the_single_process_step(two_gpus, path):
    data, ranks = two_gpus
    single = model().cuda()
    loss = BarlowTwinsLoss(LAMBD, path)(*single(data["x1"].cuda(), data["x2"].cuda()))
    loss.backward()
    grads = [p.grad.cpu() for p in single.parameters()]
    for res in ranks:
        r = res[path]
        torch.testing.assert_close(r["loss"], loss.detach().cpu(), rtol=1e-4, atol=0)
        for a, b in zip(r["grads"], grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()) + 1e-7)
        for a, b in zip(r["buffers"], single.buffers(), strict=True):  # SyncBN running stats of the global batch
            if a.is_floating_point():
                torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-5)
