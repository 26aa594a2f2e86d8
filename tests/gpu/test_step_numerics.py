"""CUDA numerics of the training step: the loss under bf16 autocast, torch.compile against eager, SyncBatchNorm's
conversion (its numerics across two ranks: tests/runtime/test_two_ranks_one_device.py).

Skipped without a GPU. Run on a lent GPU by bench/gpu.sh (with the rest of tests/gpu/).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from barlow.loss import BarlowTwinsLoss
from barlow.model import BarlowTwins

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LAMBD = 5e-3


def small_model() -> BarlowTwins:
    torch.manual_seed(0)
    return BarlowTwins("resnet18", "256-256", small_images=True, width=16)


def pair(n: int = 32, size: int = 32, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(n, 3, size, size, generator=g)
    x2 = x1 + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return x1.to(device), x2.to(device)


def paper_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    n, d = z1.shape
    z1n = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + 1e-5)
    z2n = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + 1e-5)
    c = z1n.T @ z2n / n
    eye = torch.eye(d, dtype=torch.bool, device=c.device)
    return ((1 - c[eye]) ** 2).sum() + LAMBD * (c[~eye] ** 2).sum()


@pytest.mark.parametrize("path", ["direct", "lean", "sharded"])
@pytest.mark.parametrize("n,d", [(64, 512), (512, 64)])
def test_float32_loss_on_cuda_equals_the_float64_formula(path, n, d):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = 0.5 * z1 + torch.randn(n, d, generator=g, dtype=torch.float64)
    loss = BarlowTwinsLoss(LAMBD, path)(z1.float().cuda(), z2.float().cuda())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), paper_loss(z1, z2), rtol=1e-4, atol=0)


@pytest.mark.parametrize("path", ["direct", "lean", "sharded"])
def test_loss_under_bf16_autocast_computes_in_float32(path):
    # CUDA autocast would run the loss's matmuls in bf16 (about 1e-2 off); the loss switches it off for itself.
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(128, 1024, generator=g).cuda().bfloat16() for _ in range(2))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = BarlowTwinsLoss(LAMBD, path)(z1, z2)
    ref = BarlowTwinsLoss(LAMBD, path)(z1.float(), z2.float())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)


def _step(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        z1, z2 = model(x1, x2)
    loss = BarlowTwinsLoss(LAMBD)(z1, z2)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    va, vb = torch.cat([t.flatten().float() for t in a]), torch.cat([t.flatten().float() for t in b])
    return float(va @ vb / (va.norm() * vb.norm()))


def test_bf16_channels_last_step_is_within_tolerance_of_float32():
    fp32 = small_model().cuda()
    bf16 = copy.deepcopy(fp32).to(memory_format=torch.channels_last)
    x1, x2 = pair()
    loss32, grads32 = _step(fp32, x1, x2, bf16=False)
    cl = [x.contiguous(memory_format=torch.channels_last) for x in (x1, x2)]
    loss16, grads16 = _step(bf16, *cl, bf16=True)
    assert torch.isfinite(loss16)
    # bf16 activations carry ~3 significant digits; the loss and the gradient's direction survive that.
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
    assert _cosine(grads16, grads32) > 0.99


def test_compiled_model_equals_eager():
    eager = small_model().cuda()
    compiled_base = copy.deepcopy(eager)
    compiled = torch.compile(compiled_base)
    x1, x2 = pair()
    # float32 throughout: TF32 convolutions (cuDNN's default) would leave ~1e-3 between two algorithm choices
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for _ in range(2):  # the first call compiles, the second reuses the graph
            loss_e, grads_e = _step(eager, x1, x2, bf16=False)
            loss_c, grads_c = _step(compiled, x1, x2, bf16=False)
            torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=0)
            for a, b in zip(grads_c, grads_e, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()) + 1e-7)
    for a, b in zip(compiled_base.buffers(), eager.buffers(), strict=True):  # BN running statistics, after 2 steps each
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sync_batchnorm_conversion_keeps_every_bn_and_the_checkpoint_keys():
    # Conversion only: SyncBatchNorm's numerics need a real group of two ranks (with one process, or a group of one,
    # it is plain BatchNorm and no comparison can fail); tests/runtime/test_two_ranks_one_device.py runs them on cuda:0.
    model = small_model()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).cuda()
    assert bns and sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == len(bns)
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in synced.modules())
    assert list(synced.state_dict()) == list(model.state_dict())  # checkpoints load either way
