"""barlow's SyncBatchNorm on CUDA with 2 gloo ranks on one GPU: forward, backward and running statistics equal
torch's nn.SyncBatchNorm to 1e-6, and a warm step of a converted model queues no `nonzero` / boolean `index` (torch's
empty-rank filter, a device-to-host sync in every BatchNorm layer; its SyncBatchNorm shows it, so the check can see
it). The single-process sync test (test_train_syncs.py) cannot: SyncBatchNorm only synchronises with 2+ ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

WORLD, N, C = 2, 8, 16
FILTER_OPS = {"aten::nonzero", "aten::index", "aten::masked_select"}  # a shape read from device values


def _bn(channels: int) -> nn.Module:
    bn = nn.BatchNorm2d(channels, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, channels))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    return nn.Sequential(bn)


def _step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(dy)
    bn = model[0]
    return {k: v.detach().cpu() for k, v in {"y": y, "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                                              "mean": bn.running_mean, "var": bn.running_var}.items()}


def _ops(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events()})


def _rank_main(rank: int, port: int, out: str) -> None:
    from barlow.model import BarlowTwins
    from barlow.syncbn import convert_sync_batchnorm

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.cuda.set_device(0)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(N, C, 6, 6, generator=g) * 3 + 1).to(memory_format=torch.channels_last)
        dy = torch.randn(N, C, 6, 6, generator=g).to(memory_format=torch.channels_last)
        x, dy = x.chunk(WORLD)[rank].cuda(), dy.chunk(WORLD)[rank].cuda()
        ours = convert_sync_batchnorm(_bn(C)).cuda()
        theirs = nn.SyncBatchNorm.convert_sync_batchnorm(_bn(C)).cuda()
        result = {"ours": [_step(ours, x, dy), _step(ours, x * 0.5, dy)],
                  "theirs": [_step(theirs, x, dy), _step(theirs, x * 0.5, dy)],
                  "ops_theirs": _ops(lambda: _step(theirs, x, dy))}
        model = convert_sync_batchnorm(BarlowTwins("resnet18", "64-64", small_images=True, width=8)).cuda()
        model = model.to(memory_format=torch.channels_last)
        v1, v2 = (torch.randn(4, 3, 16, 16, device="cuda").to(memory_format=torch.channels_last) for _ in range(2))

        def model_step():
            z1, z2 = model(v1, v2)
            (z1.square().sum() + z2.square().sum()).backward()

        model_step()  # warm: cuDNN's choices, the allocator's blocks
        torch.cuda.synchronize()
        result["ops_model"] = _ops(model_step)
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("syncbn-cuda")
    mp.spawn(_rank_main, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_barlow_syncbn_equals_torch_syncbn_on_cuda(ranks):
    for r in ranks:
        for ours, theirs in zip(r["ours"], r["theirs"], strict=True):
            for k in ours:
                torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-6, msg=k)


def test_a_warm_step_of_a_converted_model_has_no_device_dependent_shape(ranks):
    for r in ranks:
        assert FILTER_OPS & set(r["ops_theirs"]), "torch's SyncBatchNorm shows its filter: the check can see it"
        assert not FILTER_OPS & set(r["ops_model"]), sorted(FILTER_OPS & set(r["ops_model"]))
