"""LARS against hand computation and against the per-parameter LARS it replaced, the parameter groups, the schedule."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from barlow.optim import LARS, WarmupCosine, param_groups

LR, WD, MOMENTUM, ETA = 0.5, 0.01, 0.9, 0.001


def norm(t: torch.Tensor) -> float:
    return math.sqrt(sum(x * x for x in t.flatten().tolist()))


def lars_update(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The official rule for a matrix, written out with Python floats."""
    dp = g + WD * p
    q = ETA * norm(p) / norm(dp) if norm(p) > 0 and norm(dp) > 0 else 1.0
    return q * dp


def test_two_lars_steps_equal_the_hand_computation():
    w0 = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]], dtype=torch.float64)
    b0 = torch.tensor([0.3, -0.7, 2.0], dtype=torch.float64)
    w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    opt = LARS([w, b], lr=LR, weight_decay=WD, momentum=MOMENTUM, eta=ETA)
    grads = [(torch.tensor([[0.2, 0.1, -0.4], [0.0, 1.5, 0.3]]), torch.tensor([1.0, -2.0, 0.5])),
             (torch.tensor([[-0.3, 0.2, 0.2], [0.1, -0.5, 0.9]]), torch.tensor([0.5, 0.5, -1.0]))]
    grads = [(gw.double(), gb.double()) for gw, gb in grads]
    mu_w, mu_b, ew, eb = torch.zeros_like(w0), torch.zeros_like(b0), w0.clone(), b0.clone()
    for gw, gb in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        mu_w = MOMENTUM * mu_w + lars_update(ew, gw)
        mu_b = MOMENTUM * mu_b + gb  # 1-D: no weight decay, no trust ratio
        ew, eb = ew - LR * mu_w, eb - LR * mu_b
        torch.testing.assert_close(w.detach(), ew, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(b.detach(), eb, rtol=1e-12, atol=1e-15)


def test_one_dimensional_params_are_neither_decayed_nor_adapted():
    b = nn.Parameter(torch.tensor([100.0, -50.0]))
    b.grad = torch.tensor([1.0, 2.0])
    LARS([b], lr=0.1, weight_decay=0.5, eta=0.001).step()
    # A decayed or trust-scaled update would move b by far more or far less than lr * g.
    torch.testing.assert_close(b.detach(), torch.tensor([100.0 - 0.1, -50.0 - 0.2]))


@pytest.mark.parametrize("p,g,expected", [
    (torch.zeros(2, 2), torch.ones(2, 2), torch.full((2, 2), -0.1)),  # ||p|| = 0: plain SGD step lr * g
    (torch.ones(2, 2), torch.zeros(2, 2), torch.ones(2, 2)),  # ||dp|| = 0 (wd 0): no step, no NaN
])
def test_zero_norms_use_trust_ratio_one(p, g, expected):
    w = nn.Parameter(p.clone())
    w.grad = g
    LARS([w], lr=0.1, weight_decay=0.0).step()
    torch.testing.assert_close(w.detach(), expected)


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    opt = LARS(param_groups(model, 0.2, 0.01), lr=0.0)
    x = torch.randn(8, 4)

    def step(m, o):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()

    step(model, opt)
    clone = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    clone.load_state_dict(model.state_dict())
    resumed = LARS(param_groups(clone, 0.2, 0.01), lr=0.0)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # through bytes, as a checkpoint does (and so no tensor is shared)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert all("mu" in s for s in resumed.state.values())
    assert [g["name"] for g in resumed.param_groups] == ["weights", "biases"]
    step(model, opt)
    step(clone, resumed)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class LoopLARS(torch.optim.Optimizer):
    """The LARS of barlow/optim.py before its multi-tensor step (verbatim, less validation): the reference."""

    def __init__(self, params, lr, weight_decay=1.5e-6, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    p_norm, dp_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(dp)
                    q = torch.where((p_norm > 0) & (dp_norm > 0), group["eta"] * p_norm / dp_norm, torch.ones_like(p_norm))
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])


class Awkward(nn.Module):
    """Conv, BatchNorm, linear layers, a zero matrix (||p|| = 0), a matrix that gets no gradient, one with g = 0."""

    def __init__(self, dtype):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, dtype=dtype)
        self.bn = nn.BatchNorm2d(4, dtype=dtype)
        self.fc = nn.Linear(4, 3, dtype=dtype)
        self.zero = nn.Parameter(torch.zeros(3, 3, dtype=dtype))  # ||p|| = 0 at the first step: trust ratio 1
        self.unused = nn.Parameter(torch.ones(2, 2, dtype=dtype))  # grad stays None: skipped, no state
        self.still = nn.Parameter(torch.ones(3, 2, dtype=dtype))  # g = 0 and (in the group without decay) dp = 0

    def forward(self, x):
        h = self.fc(self.bn(self.conv(x)).mean((2, 3)))
        return h @ self.zero + 0 * (h @ self.still).sum()


def _groups(model):
    """Two groups with different hyper-parameters; the second has no weight decay (so 'still' has ||dp|| = 0)."""
    return [{"params": [model.conv.weight, model.fc.weight, model.zero, model.unused, model.bn.weight],
             "lr": 0.3, "weight_decay": 0.05, "momentum": 0.9, "eta": 0.02},
            {"params": [model.conv.bias, model.fc.bias, model.bn.bias, model.still],
             "lr": 0.05, "weight_decay": 0.0, "momentum": 0.8, "eta": 0.001}]


def _train(model, opt, x, steps):
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - 1).pow(2).sum().backward()
        opt.step()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 0.0), (torch.float32, 1e-6)])
@pytest.mark.parametrize("foreach", [True, False])
def test_lars_equals_the_per_parameter_lars_it_replaced(dtype, tol, foreach):
    torch.manual_seed(0)
    ref_model = Awkward(dtype)
    model = Awkward(dtype)
    model.load_state_dict(ref_model.state_dict())
    x = torch.randn(6, 2, 5, 5, dtype=dtype)
    ref_opt = LoopLARS(_groups(ref_model), lr=0.0)
    opt = LARS(_groups(model), lr=0.0, foreach=foreach)
    _train(ref_model, ref_opt, x, 3)
    _train(model, opt, x, 3)
    # Round trip through bytes into a fresh LARS (the resume path), then more steps on both.
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed = LARS(_groups(model), lr=0.0, foreach=foreach)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert model.unused not in resumed.state  # never had a gradient
    _train(ref_model, ref_opt, x, 3)
    _train(model, resumed, x, 3)
    assert not torch.equal(model.zero, torch.zeros_like(model.zero))  # the zero-norm matrix did move
    torch.testing.assert_close(model.still, torch.ones_like(model.still))  # dp = 0: never moved
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        if p in resumed.state:
            torch.testing.assert_close(resumed.state[p]["mu"], ref_opt.state[q]["mu"], rtol=tol, atol=tol)


def test_param_groups_split_by_ndim_and_carry_base_lr():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)  # frozen parameters are left out
    weights, biases = param_groups(model, lr_weights=0.2, lr_biases=0.0048)
    assert weights["name"] == "weights" and biases["name"] == "biases"
    assert weights["base_lr"] == 0.2 and biases["base_lr"] == 0.0048
    assert {id(p) for p in weights["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in biases["params"]} == {id(model[1].weight), id(model[1].bias), id(model[3].bias)}


@pytest.mark.parametrize("warmup,total,step,expected", [
    (10, 100, 0, 0.1),  # 1 / warmup_steps
    (10, 100, 4, 0.5),
    (10, 100, 9, 1.0),  # end of warmup: peak
    (10, 100, 9 + 45, (1 + 0.001) / 2),  # half way down the cosine
    (10, 100, 99, 0.001),  # last step: final_ratio
    (10, 100, 500, 0.001),  # past the end: stays there
    (0, 100, 0, 1.0),  # no warmup: starts at the peak
    (0, 100, 99, 0.001),
    (1, 1, 0, 1.0),
])
def test_schedule_factor(warmup, total, step, expected):
    assert WarmupCosine(warmup, total, batch_size=256).factor(step) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_schedule_is_monotone_after_warmup():
    s = WarmupCosine(5, 50, batch_size=256)
    values = [s.factor(i) for i in range(50)]
    assert all(a < b for a, b in zip(values[:4], values[1:5], strict=True))
    assert all(a > b for a, b in zip(values[4:-1], values[5:], strict=True))


def test_apply_sets_each_group_to_base_lr_times_batch_over_256():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    opt = LARS(param_groups(model, lr_weights=0.2, lr_biases=0.0048), lr=0.0)
    s = WarmupCosine(warmup_steps=10, total_steps=100, batch_size=2048)
    s.apply(opt, 9)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2 * 8, 0.0048 * 8])
    s.apply(opt, 0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2 * 8 / 10, 0.0048 * 8 / 10])
    s.apply(opt, 99)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2 * 8 * 0.001, 0.0048 * 8 * 0.001])


@pytest.mark.parametrize("kwargs,field", [
    (dict(warmup_steps=10, total_steps=0, batch_size=256), "total_steps"),
    (dict(warmup_steps=11, total_steps=10, batch_size=256), "warmup_steps"),
    (dict(warmup_steps=-1, total_steps=10, batch_size=256), "warmup_steps"),
    (dict(warmup_steps=1, total_steps=10, batch_size=0), "batch_size"),
    (dict(warmup_steps=1, total_steps=10, batch_size=256, final_ratio=2.0), "final_ratio"),
])
def test_bad_schedule_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        WarmupCosine(**kwargs)


def test_bad_lars_argument_names_the_field():
    with pytest.raises(ValueError, match="momentum"):
        LARS([nn.Parameter(torch.zeros(2, 2))], lr=0.1, momentum=-1)
