"""Two gloo ranks on ONE device take the same two LARS steps as one process on the whole batch, and their checkpoint
resumes exactly.

The multi-rank path (DDP, SyncBatchNorm on CUDA, the feature-sharded loss, the rank-0 checkpoint with a barrier)
runs on a one-GPU machine only this way: NCCL refuses two ranks on one device, gloo does not. The same test runs in
CI on the CPU (both ranks on the CPU) and in bench/gpu.sh on CUDA (both ranks on cuda:0), so the code path is the
one a multi-GPU run takes, through barlow's own set-up: `distributed.setup`, `train.build_model`,
`train.wrap_for_speed`, `LARS` + `WarmupCosine`, `BarlowTwinsLoss(path="sharded")` and `Checkpointer`.

Batch-norm statistics: on CUDA `build_model` converts BatchNorm to SyncBatchNorm (the global batch's statistics,
as the paper), so the reference is one process on the whole batch. On the CPU it does not (SyncBatchNorm is
CUDA-only), so each rank normalises its own half; the reference then runs the model per half and the loss on the
whole batch, which is what a CPU run with two processes computes.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port

WORLD, N, SIZE, LAMBD = 2, 16, 32, 5e-3  # N: global pairs per step; each rank holds N / WORLD
STEPS = 2
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]


def _spec(device: str, out: str):
    from barlow.spec import parse_spec

    return parse_spec({
        "kind": "pretrain", "name": "two-ranks",
        "data": {"train": f"{out}/no-images", "image_size": SIZE, "workers": 0},
        # projector width 64: divisible by WORLD, so the loss takes the feature-sharded path (checked below)
        "model": {"arch": "resnet18", "small_images": True, "width": 8, "projector": "64-64"},
        "optim": {"epochs": 2, "batch_size": N, "warmup_epochs": 1, "lambd": LAMBD},
        "runtime": {"nproc_per_node": WORLD, "device": device, "precision": "fp32", "compile": "off"},
        "output": {"url": f"{out}/run", "checkpoint_every": STEPS, "keep": 1},
    })


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x1 = torch.randn(N, 3, SIZE, SIZE, generator=g)
        out.append((x1, x1 + 0.3 * torch.randn(N, 3, SIZE, SIZE, generator=g)))
    return out


@contextlib.contextmanager
def _full_fp32():
    # TF32 convolutions would differ between batch 8 and batch 16 by ~1e-3; the comparison is of float32 arithmetic.
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _parts(spec, place):
    """Model, optimizer and schedule as set-up builds them."""
    from barlow import train
    from barlow.optim import LARS, WarmupCosine, param_groups

    o = spec.optim
    torch.manual_seed(spec.runtime.seed)
    model = train.build_model(spec, place)
    optimizer = LARS(param_groups(model, o.lr_weights, o.lr_biases), lr=0.0, weight_decay=o.weight_decay,
                     momentum=o.momentum, eta=o.lars_eta)
    return model, optimizer, WarmupCosine(1, 4, o.batch_size)


def _state(model, optimizer) -> dict:
    return {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "momentum": [optimizer.state[p]["mu"].detach().cpu().clone() if "mu" in optimizer.state[p]
                         else torch.zeros(0) for p in model.parameters()],
            "grads": [p.grad.detach().cpu().clone() for p in model.parameters()]}


def _loss_or_error(loss_fn, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor | str:
    """The loss, or the error's line: a collective this stack lacks fails its check without hiding the others."""
    try:
        return loss_fn(z1, z2).cpu()
    except RuntimeError as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _rank_main(rank: int, device: str, port: int, out: str) -> None:
    from barlow import distributed, train
    from barlow.checkpoint import Checkpointer
    from barlow.loss import BarlowTwinsLoss

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK="0")  # every rank on device 0
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # as _full_fp32, for this process
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        spec = _spec(device, out)
        place = distributed.setup(spec.runtime)  # the group exists: setup only places this rank
        assert (place.rank, place.world_size, place.device) == (rank, WORLD, torch.device(device, 0) if device == "cuda"
                                                                 else torch.device("cpu"))
        model, optimizer, schedule = _parts(spec, place)
        forward = train.wrap_for_speed(model, spec.runtime, place)
        loss_fn = BarlowTwinsLoss(LAMBD, "sharded")
        losses, paths = [], []
        for step, (x1, x2) in enumerate(_batches()):
            mine = (x.chunk(WORLD)[rank].to(place.device) for x in (x1, x2))
            schedule.apply(optimizer, step)
            z1, z2 = forward(*mine)
            paths.append(loss_fn.chosen_path(*z1.shape))
            loss = loss_fn(z1, z2)
            if step == 0:  # the other exact paths' collectives (all-reduce of C, all-gather of the views) on this stack
                others = {p: _loss_or_error(BarlowTwinsLoss(LAMBD, p), z1.detach(), z2.detach()) for p in ("direct", "lean")}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().cpu())
        live = _state(model, optimizer)
        run = {"world_size": WORLD}
        Checkpointer(spec.output.url, every=STEPS, keep=1, is_main=place.is_main, run=run,
                     parts={"model": model, "optimizer": optimizer}).save(STEPS, wait=True)
        fresh_model, fresh_optimizer, _ = _parts(spec, place)
        resumed = Checkpointer(spec.output.url, every=STEPS, keep=1, is_main=place.is_main, run=run,
                               parts={"model": fresh_model, "optimizer": fresh_optimizer})
        step = resumed.resume()
        for p, q in zip(model.parameters(), fresh_model.parameters(), strict=True):
            q.grad = p.grad  # grads are not checkpointed; copied so _state compares the rest
        torch.save({"losses": losses, "paths": paths, "others": others, "live": live, "resumed_step": step,
                    "resumed": _state(fresh_model, fresh_optimizer), "synced_bn": any(
                        isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _two_ranks(device: str, out: Path) -> list[dict]:
    ctx = mp.spawn(_rank_main, args=(device, free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish in 240 s")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _one_process(device: str, out: Path, per_rank_bn: bool) -> tuple[list[torch.Tensor], dict]:
    """One process, the whole batch, the same steps; BatchNorm over each rank's half where the ranks' BN is local."""
    from barlow.distributed import Placement
    from barlow.loss import BarlowTwinsLoss

    spec = _spec(device, str(out))
    model, optimizer, schedule = _parts(spec, Placement(0, 1, 0, torch.device(device), None))
    loss_fn, losses = BarlowTwinsLoss(LAMBD, "direct"), []
    with _full_fp32():
        for step, batch in enumerate(_batches()):
            losses.append(_reference_step(model, optimizer, schedule, loss_fn, step, batch, device, per_rank_bn))
    return losses, _state(model, optimizer)


def _reference_step(model, optimizer, schedule, loss_fn, step: int, batch, device: str, per_rank_bn: bool) -> torch.Tensor:
    x1, x2 = (x.to(device) for x in batch)
    schedule.apply(optimizer, step)
    if per_rank_bn:
        halves = [model(a, b) for a, b in zip(x1.chunk(WORLD), x2.chunk(WORLD), strict=True)]
        z1, z2 = torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])
    else:
        z1, z2 = model(x1, x2)
    loss = loss_fn(z1, z2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach().cpu()


@pytest.mark.slow  # two spawned processes: 12 to 40 s on a busy 2-core CPU
@pytest.mark.parametrize("device", DEVICES)
def test_two_ranks_on_one_device_take_the_one_process_steps(device, tmp_path):
    ranks = _two_ranks(device, tmp_path)
    synced = ranks[0]["synced_bn"]
    assert synced == (device == "cuda")  # build_model syncs BatchNorm across ranks on CUDA only
    losses, ref = _one_process(device, tmp_path, per_rank_bn=not synced)
    if synced:  # SyncBatchNorm did synchronise: BatchNorm over each half gives another loss (here by ~10 %)
        local, _ = _one_process(device, tmp_path, per_rank_bn=True)
        assert not torch.allclose(torch.stack(ranks[0]["losses"]), torch.stack(local), rtol=1e-3, atol=0)
    for r in ranks:
        assert r["paths"] == ["sharded"] * STEPS
        # The loss is a sum of ~4000 float32 terms whose inputs differ only in summation order: 1e-5 relative.
        torch.testing.assert_close(torch.stack(r["losses"]), torch.stack(losses), rtol=1e-5, atol=0)
        # Gradients of the last step: per-rank partial sums of float32 convolution and BN reductions, averaged by
        # DDP, against one sum; 1e-3 relative, with an absolute floor of 1e-4 of each tensor's largest entry for
        # entries near zero.
        for a, b in zip(r["live"]["grads"], ref["grads"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()) + 1e-8)
        # Weights after two LARS steps: the steps are lr-scaled, so gradient rounding moves them far less.
        for (name, a), b in zip(r["live"]["model"].items(), ref["model"].values(), strict=True):
            if a.is_floating_point() and (synced or "running_" not in name):  # local BN: each rank's own statistics
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
        for a, b in zip(r["live"]["momentum"], ref["momentum"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()) + 1e-8)
        # The checkpoint round trip: rank 0 wrote, every rank resumed its exact state.
        assert r["resumed_step"] == STEPS
        torch.testing.assert_close(r["resumed"], {**ranks[0]["live"], "grads": r["live"]["grads"]}, rtol=0, atol=0)
    for r in ranks:  # last: a failure here leaves the checks above standing
        for path, value in r["others"].items():
            assert isinstance(value, torch.Tensor), f"the {path} path on {device}: {value}"
            torch.testing.assert_close(value, losses[0], rtol=1e-5, atol=0, msg=path)
    # DDP keeps the replicas identical: same weights on both ranks, bit for bit.
    for (name, a), b in zip(ranks[0]["live"]["model"].items(), ranks[1]["live"]["model"].values(), strict=True):
        if synced or "running_" not in name:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
