"""BarlowTwinsLoss against a plain transcription of the paper, the paths against each other, autocast, and the global batch on 2 and 4 ranks."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from barlow.loss import BarlowTwinsLoss, bytes_sent, cross_correlation

LAMBD = 5e-3
SHAPES = [(32, 8), (8, 32), (16, 16), (5, 64), (64, 5)]  # (N, D): N > D, N < D and equal


def paper_terms(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's formula, written out: per-dimension batch normalisation, C = z1n^T z2n / N, the two sums."""
    n, d = z1.shape
    z1n = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + 1e-5)
    z2n = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + 1e-5)
    c = z1n.T @ z2n / n
    eye = torch.eye(d, dtype=torch.bool)
    return ((1 - c[eye]) ** 2).sum(), (c[~eye] ** 2).sum()


def paper_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = LAMBD) -> torch.Tensor:
    on, off = paper_terms(z1, z2)
    return on + lambd * off


def views(n: int, d: int, dtype=torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=dtype) * 3 + 1
    z2 = 0.5 * z1 + torch.randn(n, d, generator=g, dtype=dtype)  # correlated views, as after some training
    return z1, z2


def value_and_grads(fn, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = fn(a, b)
    loss.backward()
    return loss.detach(), a.grad, b.grad


@pytest.mark.parametrize("path", ["direct", "lean", "auto"])
@pytest.mark.parametrize("n,d", SHAPES)
def test_loss_and_gradients_equal_the_paper_formula(n, d, path):
    z1, z2 = views(n, d)
    crit = BarlowTwinsLoss(LAMBD, path)
    loss, g1, g2 = value_and_grads(crit, z1, z2)
    ref, r1, r2 = value_and_grads(paper_loss, z1, z2)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(g1, r1, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(g2, r2, rtol=1e-8, atol=1e-12)
    on, off = paper_terms(z1, z2)
    assert crit.on_diag.dtype == crit.off_diag.dtype == torch.float32 and not crit.on_diag.requires_grad
    torch.testing.assert_close(crit.on_diag, on.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(crit.off_diag, off.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,d", SHAPES)
def test_float32_loss_matches_float64_reference(n, d):
    z1, z2 = views(n, d)
    loss = BarlowTwinsLoss(LAMBD)(z1.float(), z2.float())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), paper_loss(z1, z2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,d", [(8, 256), (64, 512), (300, 128)])
def test_lean_equals_direct_in_float32(n, d):
    z1, z2 = views(n, d, dtype=torch.float32)
    direct = value_and_grads(BarlowTwinsLoss(LAMBD, "direct"), z1, z2)
    lean = value_and_grads(BarlowTwinsLoss(LAMBD, "lean"), z1, z2)
    for a, b in zip(direct, lean, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize("n,d,expected", [(8, 32, "lean"), (32, 8, "direct"), (16, 16, "direct")])
def test_auto_picks_lean_only_when_batch_is_smaller_than_dim(n, d, expected):
    assert BarlowTwinsLoss(path="auto").chosen_path(n, d) == expected
    assert BarlowTwinsLoss(path="direct").chosen_path(n, d) == "direct"


@pytest.mark.parametrize("path", ["direct", "lean"])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_autocast_bf16_still_computes_in_float32(path, in_dtype):
    z1, z2 = views(64, 48, dtype=torch.float32)
    z1, z2 = z1.to(in_dtype), z2.to(in_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = BarlowTwinsLoss(LAMBD, path)(z1, z2)
    ref = BarlowTwinsLoss(LAMBD, path)(z1.float(), z2.float())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # bf16 matmuls (autocast left on) miss this by ~1e-3 relative.
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)


def test_cross_correlation_is_c_without_grad():
    z1, z2 = views(20, 6, dtype=torch.float32)
    z1.requires_grad_()
    c = cross_correlation(z1, z2)
    z1n = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + 1e-5)
    z2n = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + 1e-5)
    assert c.shape == (6, 6) and c.dtype == torch.float32 and not c.requires_grad
    torch.testing.assert_close(c, (z1n.T @ z2n / 20).detach())


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(4, 3), torch.zeros(4, 5)), "z1, z2"),
    ((torch.zeros(4), torch.zeros(4)), "z1, z2"),
    ((torch.zeros(1, 3), torch.zeros(1, 3)), "at least 2"),
])
def test_bad_inputs_name_the_problem(args, match):
    with pytest.raises(ValueError, match=match):
        BarlowTwinsLoss()(*args)


def test_bad_path_names_the_field():
    with pytest.raises(ValueError, match="path"):
        BarlowTwinsLoss(path="fast")


@pytest.mark.parametrize("n,d", SHAPES)
def test_sharded_on_one_process_is_the_lean_formula(n, d):
    z1, z2 = views(n, d)
    loss, g1, g2 = value_and_grads(BarlowTwinsLoss(LAMBD, "sharded"), z1, z2)
    ref, r1, r2 = value_and_grads(paper_loss, z1, z2)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(g1, r1, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(g2, r2, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("n,d,world,expected", [
    (2048, 8192, 8, 58_734_606),  # 4 B x (all-to-all 2 x 7/8 x 2 x 256 x 8192 + all-reduce 2 x 7/8 x (2048 x 2049 + 2))
    (2048, 8192, 2, 2 * (2 * 1024 * 8192 // 2) * 4 + (2048 * 2049 + 2) * 4),
    (12, 18, 4, round(2 * 3 / 4 * 12 * 18) * 4),  # 4 does not divide 18: the lean fallback's bytes
    (2048, 8192, 1, 0),
])
def test_bytes_sent_by_the_sharded_path(n, d, world, expected):
    assert bytes_sent("sharded", n, d, world) == expected


@pytest.mark.parametrize("world", [8, 16, 32])
def test_at_the_papers_sizes_sharded_sends_least(world):
    sent = {p: bytes_sent(p, 2048, 8192, world) for p in ("official", "direct", "lean", "sharded")}
    assert sent["sharded"] < sent["lean"] < sent["official"] < sent["direct"]
    assert sent["official"] == round(2 * (world - 1) / world * 8192**2 * 4)


# ---- 2 and 4 ranks on gloo ------------------------------------------------------------------------------------------

N, D, D_ODD, IN = 12, 32, 18, 6  # D_ODD: 4 does not divide it (the sharded path falls back to lean on 4 ranks)
RANK_PATHS = ("direct", "lean", "sharded", "auto")


class TwinLinear(nn.Module):
    """The smallest model with BarlowTwins' forward(x1, x2) shape: one shared linear map, no BatchNorm."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(IN, D, dtype=torch.float64)

    def forward(self, x1, x2):
        return self.lin(x1), self.lin(x2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, data: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mine = {k: v.chunk(world)[rank] for k, v in data.items() if k != "state"}
        res = {}
        for path in RANK_PATHS:
            crit = BarlowTwinsLoss(LAMBD, path)
            res[path] = (*value_and_grads(crit, mine["z1"], mine["z2"]), crit.on_diag, crit.off_diag)
            res[f"odd_{path}"] = value_and_grads(crit, mine["w1"], mine["w2"])
            res[f"chosen_{path}"] = torch.tensor([RANK_PATHS.index(crit.chosen_path(N // world, D_ODD)),
                                                  RANK_PATHS.index(crit.chosen_path(N // world, D))])
            model = TwinLinear()
            model.load_state_dict(data["state"])
            ddp = DistributedDataParallel(model)
            BarlowTwinsLoss(LAMBD, path)(*ddp(mine["x1"], mine["x2"])).backward()
            res[f"ddp_{path}"] = (model.lin.weight.grad, model.lin.bias.grad)
        res["c"] = cross_correlation(mine["z1"], mine["z2"])
        torch.save(res, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory):
    """Run every path and the DDP model on W gloo processes, each with 1/W of the batch; return inputs and results."""
    world = request.param
    out = tmp_path_factory.mktemp(f"ranks{world}")
    z1, z2 = views(N, D)
    w1, w2 = views(N, D_ODD, seed=2)
    g = torch.Generator().manual_seed(1)
    data = {"z1": z1, "z2": z2, "w1": w1, "w2": w2, "x1": torch.randn(N, IN, generator=g, dtype=torch.float64),
            "x2": torch.randn(N, IN, generator=g, dtype=torch.float64), "state": TwinLinear().state_dict()}
    ctx = mp.spawn(_rank_main, args=(world, _free_port(), data, str(out)), nprocs=world, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world}-rank gloo run did not finish in 180 s")
    return world, data, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("path", RANK_PATHS)
def test_ranks_give_the_global_loss_and_world_size_times_the_local_gradient(ranks, path):
    world, data, results = ranks
    for inputs, key in (((data["z1"], data["z2"]), path), ((data["w1"], data["w2"]), f"odd_{path}")):
        ref, r1, r2 = value_and_grads(paper_loss, *inputs)
        for rank, res in enumerate(results):
            loss, g1, g2 = res[key][:3]
            torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
            # The documented convention: d(rank loss)/d(local z) = W * the single-process gradient's slice.
            torch.testing.assert_close(g1, world * r1.chunk(world)[rank], rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(g2, world * r2.chunk(world)[rank], rtol=1e-8, atol=1e-12)
    on, off = paper_terms(data["z1"], data["z2"])
    for res in results:
        torch.testing.assert_close(res[path][3], on.float())
        torch.testing.assert_close(res[path][4], off.float())


@pytest.mark.slow
@pytest.mark.parametrize("path", RANK_PATHS)
def test_ddp_parameter_gradient_equals_single_process(ranks, path):
    _, data, results = ranks
    model = TwinLinear()
    model.load_state_dict(data["state"])
    BarlowTwinsLoss(LAMBD, path)(*model(data["x1"], data["x2"])).backward()
    for res in results:
        weight, bias = res[f"ddp_{path}"]
        torch.testing.assert_close(weight, model.lin.weight.grad, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(bias, model.lin.bias.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_sharded_falls_back_to_lean_where_world_size_does_not_divide_dim(ranks):
    world, _, results = ranks
    odd, even = results[0]["chosen_sharded"].tolist()
    assert RANK_PATHS[even] == "sharded"
    assert RANK_PATHS[odd] == ("lean" if D_ODD % world else "sharded")
    # auto on N = 12 < D = 32: lean at W = 2 (sharded sends more there), sharded at W = 4 (it sends less).
    assert RANK_PATHS[results[0]["chosen_auto"][1]] == {2: "lean", 4: "sharded"}[world]


@pytest.mark.slow
def test_ranks_cross_correlation_is_the_global_c(ranks):
    _, data, results = ranks
    single = cross_correlation(data["z1"], data["z2"])
    for res in results:
        torch.testing.assert_close(res["c"], single)
