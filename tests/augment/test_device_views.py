"""barlow.augment.DeviceViews: each batched op equals torchvision v2's functional op on that one sample (same
parameters), the composed view equals the functionals applied in the drawn order, and the random parameters have the
right rates, ranges and orders, replay from the seed and leave the global RNG alone.

Tolerances: the batched ops run in float32 on [0, 1] like torchvision's functionals on float images, so they are
compared to torchvision on the float image of each sample: 1e-5 per op (the largest seen is 2e-6, HSV hue, whose
RGB form rounds differently), 1e-4 after normalisation (which divides by std ~0.225). Against today's uint8
pipeline (every op rounds to uint8) only the mean difference is bounded: 1.5/255.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from host_syncs import HostDataOnDevice
from reference_views import VariantViews, adjust_hue_linear
from torchvision.transforms.v2 import functional as F

from barlow import augment as A
from barlow.augment import IMAGENET_MEAN, IMAGENET_STD, DeviceViews, ViewParams, ViewsConfig, blur_kernel_size
from barlow.spec import AugmentSpec

OFF = dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0))


def make_views(size: int, channels: int = 3, **augment) -> DeviceViews:
    """DeviceViews for a spec's `data.augment` section (the one place its rules are checked)."""
    return DeviceViews(ViewsConfig.from_augment(AugmentSpec(**augment), size, channels))


def batch(n: int = 12, size: int = 24, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """uint8 images: random pixels, plus flat grey, pure primaries and a black/white split (HSV's edge cases)."""
    x = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8))
    x[0] = 128
    if channels == 3:
        x[1] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
        x[2, :, :, : size // 2], x[2, 0] = 0, 255
    x[3, :, : size // 2] = 255
    return x


def factors(n: int, low: float, high: float, seed: int = 1) -> torch.Tensor:
    f = torch.empty(n).uniform_(low, high, generator=torch.Generator().manual_seed(seed))
    f[:2] = torch.tensor([low, high])  # the range's ends (hue: +-0.5 wraps around)
    return f


def col(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


K = 5
OPS = [  # name, batched op on (x, f), torchvision's functional on (one image, its factor), factor range
    ("brightness", lambda x, f: A.adjust_brightness(x, col(f)), F.adjust_brightness, (0.0, 2.0)),
    ("contrast", lambda x, f: A.adjust_contrast(x, col(f)), F.adjust_contrast, (0.0, 2.0)),
    ("saturation", lambda x, f: A.adjust_saturation(x, col(f)), F.adjust_saturation, (0.0, 2.0)),
    ("hue", lambda x, f: A.adjust_hue(x, col(f)), F.adjust_hue, (-0.5, 0.5)),
    ("grayscale", lambda x, f: A.grayscale(x), lambda img, f: F.rgb_to_grayscale(img, num_output_channels=3),
     (0.0, 1.0)),
    ("blur", lambda x, f: A.gaussian_blur(x, K, f), lambda img, f: F.gaussian_blur(img, [K, K], [f, f]), (0.1, 2.0)),
    ("solarize", lambda x, f: A.solarize(x), lambda img, f: F.solarize(img, 128 / 255), (0.0, 1.0)),
]


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name,batched,reference,bounds", OPS, ids=[o[0] for o in OPS])
def test_each_op_equals_torchvision_on_each_sample(name, batched, reference, bounds, channels):
    if name == "grayscale" and channels == 1:
        pytest.skip("grayscale is a 3-channel op")
    x = batch(channels=channels).float() / 255
    f = factors(len(x), *bounds)
    out = batched(x.clone(), f)
    want = torch.stack([reference(x[i], float(f[i])) for i in range(len(x))])
    assert out.shape == want.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    if name not in ("grayscale", "solarize"):  # an op that did nothing would pass the comparison at factor 1
        assert (out - x).abs().amax() > 0.05 or (channels == 1 and name in ("saturation", "hue"))


@pytest.mark.parametrize("channels", [3, 1])
def test_normalise_and_layout(channels):
    x = batch(channels=channels)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    v1, v2 = make_views(24, channels, **OFF)(x, x, seed=3)
    want = F.normalize(x.float() / 255, mean, std)
    for v in (v1, v2):
        assert v.shape == x.shape and v.dtype == torch.float32 and v.device == x.device
        assert v.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(v, want, atol=1e-6, rtol=0)


def reference_view(img: torch.Tensor, p: ViewParams, i: int, kernel: int, channels: int) -> torch.Tensor:
    """torchvision's functionals on one image (float, or uint8 as today's pipeline), in sample i's drawn order,
    then normalise."""
    ops = (lambda t: F.adjust_brightness(t, float(p.brightness[i])),
           lambda t: F.adjust_contrast(t, float(p.contrast[i])),
           lambda t: F.adjust_saturation(t, float(p.saturation[i])),
           lambda t: F.adjust_hue(t, float(p.hue[i])))
    for op in p.order[i].tolist() if p.jitter[i] else []:
        img = ops[op](img)
    if p.gray[i]:
        img = F.rgb_to_grayscale(img, num_output_channels=3)
    if p.blur[i]:
        img = F.gaussian_blur(img, [kernel, kernel], [float(p.sigma[i])] * 2)
    if p.solarize[i]:
        img = F.solarize(img, 128 / 255 if img.is_floating_point() else 128)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    return F.normalize(F.to_dtype(img, torch.float32, scale=True), mean, std)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("probs", [dict(), dict(jitter_prob=1.0, grayscale_prob=0.5, blur_prob=(0.5, 0.5),
                                                solarize_prob=(0.5, 0.5))], ids=["byol", "half"])
def test_composed_views_equal_torchvision_in_the_drawn_order(channels, probs):
    size, n = 24, 40
    views = make_views(size, channels, **probs)
    x1, x2 = batch(n, size, channels, seed=1), batch(n, size, channels, seed=2)
    params = views.draw(n, seed=11)
    out = views.apply(x1, x2, params)
    for x, p, o in zip((x1, x2), params, out, strict=True):
        want = torch.stack([reference_view(x[i].float() / 255, p, i, blur_kernel_size(size), channels)
                            for i in range(n)])
        torch.testing.assert_close(o, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(views(x1, x2, seed=11)[1], out[1], atol=0, rtol=0)  # forward = draw + apply


def test_close_to_todays_uint8_pipeline():
    """Float throughout vs rounding to uint8 after every op: small on average (solarize/hue may flip single pixels)."""
    size, n = 24, 32
    views = make_views(size)
    x = batch(n, size)
    p = views.draw(n, seed=5)[0]
    ours = views.apply_view(x, p)
    ref = [reference_view(x[i], p, i, blur_kernel_size(size), 3) for i in range(n)]
    diff = (ours - torch.stack(ref)) * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)  # back to [0, 1] units
    assert diff.abs().mean() < 1.5 / 255


# ---- random parameters -------------------------------------------------------------------------------------------

N = 4096


def within(rate: float, p: float, n: int = N) -> bool:
    return abs(rate - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9


@pytest.mark.parametrize("view", [0, 1])
def test_parameter_rates_ranges_and_orders(view):
    views = make_views(8, jitter_prob=0.8, grayscale_prob=0.2, blur_prob=(1.0, 0.1), solarize_prob=(0.0, 0.2))
    p = views.draw_view(N, seed=7, view=view)
    assert within(p.jitter.float().mean().item(), 0.8)
    assert within(p.gray.float().mean().item(), 0.2)
    assert within(p.blur.float().mean().item(), (1.0, 0.1)[view])
    assert within(p.solarize.float().mean().item(), (0.0, 0.2)[view])
    for name, (low, high) in [("brightness", (0.6, 1.4)), ("contrast", (0.6, 1.4)), ("saturation", (0.8, 1.2)),
                              ("hue", (-0.1, 0.1)), ("sigma", (0.1, 2.0))]:
        v = getattr(p, name)
        assert v.dtype == torch.float32 and v.min() >= low and v.max() <= high, name
        assert v.min() < low + 0.01 * (high - low) and v.max() > high - 0.01 * (high - low), name  # fills the range
    assert (p.order.sort(dim=1).values == torch.arange(4)).all()  # each row a permutation of the four ops
    seen = {tuple(r) for r in p.order.tolist()}
    assert seen == set(itertools.permutations(range(4)))  # all 24 orders appear
    first = torch.bincount(p.order[:, 0], minlength=4).float() / N
    assert all(within(r, 0.25) for r in first.tolist())


@pytest.mark.parametrize("field,probs", [
    ("jitter", dict(OFF, jitter_prob=0.5)),
    ("gray", dict(OFF, grayscale_prob=0.5)),
    ("blur", dict(OFF, blur_prob=(0.5, 0.5))),
    ("solarize", dict(OFF, solarize_prob=(0.5, 0.5))),
])
def test_each_op_changes_exactly_the_drawn_samples(field, probs):
    n = 512
    views = make_views(8, **probs)
    x = batch(n, 8, seed=3)
    x[:4] = batch(4, 8, seed=4)[3]  # no grey/constant images here: every op changes a random image
    p = views.draw_view(n, seed=9, view=0)
    p = dataclasses.replace(p, sigma=p.sigma.clamp(min=0.5))  # sigma ~0.1 blurs by less than float rounding
    mask = getattr(p, field)
    plain = dataclasses.replace(p, **{field: torch.zeros_like(mask)})
    changed = (views.apply_view(x, p) - views.apply_view(x, plain)).abs().flatten(1).amax(1) > 1e-6
    assert torch.equal(changed, mask)
    assert within(mask.float().mean().item(), 0.5, n)


def test_channels_one_never_grays():
    assert not make_views(8, channels=1, grayscale_prob=1.0).draw_view(256, 0, 0).gray.any()


def test_seeds_replay_differ_and_leave_the_global_rng_alone():
    views = make_views(16)
    x = batch(16, 16)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a1, a2 = views(x, x, seed=123)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not drawn from
    torch.manual_seed(99)
    b1, b2 = views(x, x, seed=123)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    c1, _ = views(x, x, seed=124)
    assert not torch.equal(a1, c1)
    assert not torch.equal(a1, a2)  # same input, two views: independent parameters
    p1, p2 = views.draw(64, seed=123)
    assert not torch.equal(p1.brightness, p2.brightness) and not torch.equal(p1.order, p2.order)


def test_reference_variants_name_a_bad_hue():
    with pytest.raises(ValueError, match="hue"):
        VariantViews(ViewsConfig(8), hue="yiq")


def test_bad_batches_name_the_problem():
    views = make_views(8)
    with pytest.raises(ValueError, match="expected a"):
        views(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="one shape"):
        views(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(3, 3, 8, 8, dtype=torch.uint8), 0)


def test_linear_hue_is_an_explicit_luma_keeping_rotation():
    x = batch(8, 16).float() / 255
    zero, shift = torch.zeros(8), factors(8, -0.1, 0.1)
    torch.testing.assert_close(adjust_hue_linear(x, col(zero)), x, atol=1e-5, rtol=0)
    grey = torch.full((2, 3, 4, 4), 0.3)
    torch.testing.assert_close(adjust_hue_linear(grey, col(shift[:2])), grey, atol=1e-5, rtol=0)
    out = adjust_hue_linear(x, col(shift))
    assert (out - A.adjust_hue(x, col(shift))).abs().amax() > 0.01  # not torchvision's hue: an option, not default
    assert make_views(8).hue_op is A.adjust_hue  # the library's hue is torchvision's HSV one
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    turned = adjust_hue_linear(red, torch.full((1, 1, 1, 1), 1 / 12))
    assert turned[0, 1] > 0.1 and turned[0, 2] == 0  # towards yellow, as HSV's hue + 1/12 does



def test_cpu_chunks_give_the_whole_batch_result(monkeypatch):
    views = make_views(16)
    x1, x2 = batch(20, 16, seed=1), batch(20, 16, seed=2)
    whole = views(x1, x2, seed=4)
    monkeypatch.setattr(A.device, "CPU_CHUNK_PIXELS", 3 * 16 * 16)  # chunks of 3 images, the last one of 2
    chunked = views(x1, x2, seed=4)
    for w, c in zip(whole, chunked, strict=True):
        assert torch.equal(w, c) and c.is_contiguous(memory_format=torch.channels_last)


def test_float_input_is_not_written():
    x = batch(8, 16).float() / 255
    before = x.clone()
    make_views(16, jitter_prob=1.0, grayscale_prob=1.0, solarize_prob=(1.0, 1.0))(x, x, seed=0)
    assert torch.equal(x, before)


@pytest.mark.slow  # torch.compile takes about a minute on a busy 2-core machine
def test_compiled_hue_equals_eager():
    x1, x2 = batch(24, 16, seed=1), batch(24, 16, seed=2)
    eager = make_views(16)(x1, x2, seed=6)
    compiled = VariantViews(ViewsConfig(16), compile=True)(x1, x2, seed=6)
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, atol=1e-4, rtol=0)



def test_views_build_no_tensor_from_host_data_on_the_device():
    """On the meta device (it stands for CUDA here: anything not the CPU), every op of both views runs, and no constant
    or parameter reaches the device except by a non-blocking copy (from pinned memory on CUDA)."""
    views = make_views(24, jitter_prob=1.0, grayscale_prob=0.5, blur_prob=(1.0, 0.5), solarize_prob=(0.5, 0.5)).to("meta")
    x = batch(12, 24).to("meta")
    with HostDataOnDevice() as mode:
        v1, v2 = views(x, x, seed=1)
    assert v1.device.type == "meta" and v1.shape == x.shape
    assert mode.found == []
    with HostDataOnDevice() as mode:  # the check itself sees what it looks for
        torch.tensor([5.0, 3.0, 1.0], device="meta")
        torch.ones(3).to("meta")
    assert mode.found == ["tensor on meta", "blocking copy to meta"]
