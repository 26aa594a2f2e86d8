"""barlow's SyncBatchNorm (no empty-rank filter, so no host sync) on 2 gloo ranks on the CPU: forward, backward and
running statistics equal a plain BatchNorm over the concatenated global batch (what torch's SyncBatchNorm computes;
torch's refuses the CPU). Against torch's own, and the op count of a warm step, on CUDA: tests/gpu/test_syncbn_cuda.py."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port
from torch import nn

WORLD = 2
CASES = [  # name, BatchNorm class, global input shape, channels_last
    ("2d channels-last", nn.BatchNorm2d, (8, 5, 6, 7), True),
    ("2d contiguous", nn.BatchNorm2d, (6, 4, 3, 5), False),
    ("1d projector", nn.BatchNorm1d, (10, 9), False),
]


def _inputs(shape, dtype, channels_last):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    return x, dy


def _bn(cls, channels, dtype):
    bn = cls(channels, momentum=0.3).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, channels))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    return bn


def _step(bn, x, dy):
    bn.weight.grad = bn.bias.grad = None
    x = x.clone().requires_grad_()
    y = bn(x)
    y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
            "mean": bn.running_mean.clone(), "var": bn.running_var.clone()}


def _rank_main(rank: int, port: int, out: str) -> None:
    from barlow.syncbn import SyncBatchNorm, convert_sync_batchnorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, cls, shape, cl in CASES:
            for dtype in (torch.float64, torch.float32):
                x, dy = _inputs(shape, dtype, cl)
                bn = convert_sync_batchnorm(nn.Sequential(_bn(cls, shape[1], dtype)))[0]
                assert type(bn) is SyncBatchNorm
                two = [_step(bn, x.chunk(WORLD)[rank], dy.chunk(WORLD)[rank])]
                two.append(_step(bn, x.chunk(WORLD)[rank] * 0.5, dy.chunk(WORLD)[rank]))  # running stats, twice
                results[f"{name} {dtype}"] = two
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("syncbn")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 2e-5)])
@pytest.mark.parametrize("name, cls, shape, channels_last", CASES, ids=[c[0] for c in CASES])
def test_sync_batchnorm_on_two_ranks_is_batchnorm_of_the_global_batch(ranks, name, cls, shape, channels_last, dtype, tol):
    x, dy = _inputs(shape, dtype, channels_last)
    ref = _bn(cls, shape[1], dtype)
    want = [_step(ref, x, dy)]
    want.append(_step(ref, x * 0.5, dy))
    for step in range(2):
        got = [r[f"{name} {dtype}"][step] for r in ranks]
        for k in ("y", "dx"):  # each rank holds its own half of the global batch's output and input gradient
            torch.testing.assert_close(torch.cat([g[k] for g in got]), want[step][k], rtol=tol, atol=tol, msg=k)
        for k in ("dw", "db"):  # per-rank partial sums (DDP sums them, as it does torch's)
            torch.testing.assert_close(sum(g[k] for g in got), want[step][k], rtol=tol, atol=tol, msg=k)
        for g in got:  # every rank's running statistics are the global batch's: nothing for DDP to broadcast
            torch.testing.assert_close(g["mean"], want[step]["mean"], rtol=tol, atol=tol)
            torch.testing.assert_close(g["var"], want[step]["var"], rtol=tol, atol=tol)
    assert got[0]["y"].is_contiguous(memory_format=torch.channels_last) == channels_last


def test_only_plain_batchnorm_makes_ddp_broadcast_buffers_every_step():
    from barlow.model import BarlowTwins
    from barlow.runsetup import ddp_buffer_sync, rank_local_buffers
    from barlow.syncbn import convert_sync_batchnorm

    model = BarlowTwins("resnet18", "32-32", small_images=True, width=8)
    assert rank_local_buffers(model)
    assert not rank_local_buffers(convert_sync_batchnorm(model))
    # torch 2.14 deprecates broadcast_buffers (a FutureWarning per DDP); older torch has only that keyword
    assert set(ddp_buffer_sync(False)) < {"forward_sync_buffers", "broadcast_buffers"}
