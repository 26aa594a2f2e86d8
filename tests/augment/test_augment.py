"""BYOL's two views: the one views configuration built from the spec, and the per-sample reference path
(tests/support/reference_views.py: outputs, its pipeline's parameters, the per-view blur/solarize rates); the eval transforms."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image
from reference_views import GaussianBlur, TwoViews
from torchvision.transforms import v2

from barlow.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    HostDraws,
    View,
    ViewsConfig,
    blur_kernel_size,
    eval_transform,
    train_transform,
)
from barlow.augment.ops import view_ops
from barlow.spec import AugmentSpec

OFF = dict(min_scale=1.0, flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0)  # a square image passes through unchanged


def image(mode: str, w: int = 50, h: int = 37, seed: int = 0) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(rgb).convert(mode)


def find(pipeline: v2.Compose, kind: type, inner: type | None = None) -> list:
    """The ops of a kind in a view's pipeline (for RandomApply: those wrapping `inner`)."""
    ops = [t for t in pipeline.transforms if isinstance(t, kind)]
    return [t for t in ops if isinstance(t.transforms[0], inner)] if inner else ops


def to_uint8(x: torch.Tensor, channels: int = 3) -> torch.Tensor:
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    return ((x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)) * 255).round()


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_two_views_shapes_and_dtype(channels, mode):
    torch.manual_seed(0)
    v1, v2_ = TwoViews(32, channels)(image(mode))
    for v in (v1, v2_):
        assert type(v) is torch.Tensor and v.dtype == torch.float32 and v.shape == (channels, 32, 32)
        assert torch.isfinite(v).all()
    assert not torch.equal(v1, v2_)


@pytest.mark.parametrize("channels,in_channels", [(1, 3), (3, 1), (3, 3)])
def test_uint8_tensor_input(channels, in_channels):
    x = torch.randint(0, 256, (in_channels, 40, 48), dtype=torch.uint8)
    assert all(v.shape == (channels, 24, 24) for v in TwoViews(24, channels)(x))


def test_accepts_the_spec_augment_section():
    views = TwoViews(32, 3, **AugmentSpec().model_dump())
    assert (views.size, views.channels, views.min_scale) == (32, 3, 0.08)
    assert [find(v, v2.RandomApply, v2.GaussianBlur)[0].p for v in (views.view1, views.view2)] == [1.0, 0.1]
    assert [find(v, v2.RandomSolarize)[0].p for v in (views.view1, views.view2)] == [0.0, 0.2]


def test_pipeline_carries_the_configured_parameters():
    views = TwoViews(224, 3, min_scale=0.2, flip_prob=0.35, jitter_prob=0.6, grayscale_prob=0.25,
                     blur_prob=(0.7, 0.3), solarize_prob=(0.1, 0.4))
    for view, blur_p, solarize_p in ((views.view1, 0.7, 0.1), (views.view2, 0.3, 0.4)):
        (crop,) = find(view, v2.RandomResizedCrop)
        assert crop.size == (224, 224) and crop.scale == (0.2, 1.0) and crop.interpolation == v2.InterpolationMode.BICUBIC
        assert find(view, v2.RandomHorizontalFlip)[0].p == 0.35
        (jitter,) = find(view, v2.RandomApply, v2.ColorJitter)
        cj = jitter.transforms[0]
        assert jitter.p == 0.6
        assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
        assert find(view, v2.RandomGrayscale)[0].p == 0.25
        (blur,) = find(view, v2.RandomApply, v2.GaussianBlur)
        assert blur.p == blur_p
        assert blur.transforms[0].kernel_size == (23, 23) and list(blur.transforms[0].sigma) == [0.1, 2.0]
        (solarize,) = find(view, v2.RandomSolarize)
        assert solarize.p == solarize_p and solarize.threshold == 128
        (norm,) = find(view, v2.Normalize)
        assert tuple(norm.mean) == IMAGENET_MEAN and tuple(norm.std) == IMAGENET_STD


def test_grayscale_pipeline_skips_random_grayscale_and_uses_half_normalisation():
    views = TwoViews(32, 1, **OFF, blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0))
    assert not find(views.view1, v2.RandomGrayscale)
    v1, _ = views(Image.new("RGB", (32, 32), (128, 128, 128)))
    torch.testing.assert_close(v1, torch.full((1, 32, 32), (128 / 255 - 0.5) / 0.5))


@pytest.mark.parametrize("size,kernel", [(224, 23), (96, 11), (64, 7), (32, 3), (16, 3)])
def test_blur_kernel_is_about_a_tenth_of_the_size_and_odd(size, kernel):
    assert blur_kernel_size(size) == kernel


def test_per_view_blur_and_solarize_rates(one_thread):  # one thread, like a data-loader worker (tests/conftest.py)
    """Draw many view pairs of a small image whose left half shows blur and whose right half shows solarization."""
    s, n = 16, 1000
    yy, xx = np.mgrid[:s, :s]
    arr = np.full((s, s, 3), 200, dtype=np.uint8)  # right half: 200, which solarizes to 55
    arr[:, : s // 2] = np.where(((yy + xx) % 2 == 0)[:, : s // 2, None], 60, 100)  # left: a checkerboard under 128
    orig = torch.from_numpy(arr).permute(2, 0, 1).float()
    views = TwoViews(s, 3, **OFF)  # blur (1.0, 0.1), solarize (0.0, 0.2): the paper's
    torch.manual_seed(0)
    counts = np.zeros((2, 2))  # [view, (blurred, solarized)]
    for _ in range(n):
        for i, v in enumerate(views(Image.fromarray(arr))):
            px = to_uint8(v)
            counts[i, 0] += (px[:, 2:-2, 2 : s // 2 - 2] - orig[:, 2:-2, 2 : s // 2 - 2]).abs().max() > 0.5
            right = px[:, 2:-2, s // 2 + 2 : -2]
            solarized = (right - 55).abs().max() < 1
            assert solarized or (right - 200).abs().max() < 1  # nothing else touches these pixels
            counts[i, 1] += solarized
    rate = counts / n
    # Blur with sigma near 0.1 leaves uint8 pixels unchanged, so only ~92% of blurs are visible: compare with view 1.
    assert rate[0, 0] > 0.85
    assert abs(rate[1, 0] / rate[0, 0] - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n) / rate[0, 0]
    assert rate[0, 1] == 0.0
    assert abs(rate[1, 1] - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n)


@pytest.mark.parametrize("channels", [3, 1])
def test_linear_eval_transforms(channels):
    img = image("RGB", 80, 60)
    torch.manual_seed(0)
    x = train_transform(32, channels)(img)
    assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (channels, 32, 32)
    ev = eval_transform(32, channels)
    a, b = ev(img), ev(img)
    assert type(a) is torch.Tensor and a.shape == (channels, 32, 32) and torch.equal(a, b)
    assert find(ev, v2.Resize)[0].size == [37] and find(eval_transform(224), v2.Resize)[0].size == [256]


@pytest.mark.parametrize("kwargs,match", [(dict(channels=2), "channels"), (dict(size=0), "size")])
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TwoViews(**{"size": 32, **kwargs})
    with pytest.raises(ValueError, match=match):
        train_transform(**{"size": 32, **kwargs})


def test_views_config_from_the_spec_shows_both_views_side_by_side():
    spec = AugmentSpec(min_scale=0.2, flip_prob=0.35, jitter_prob=0.6, grayscale_prob=0.25, blur_prob=[0.7, 0.3],
                       solarize_prob=[0.1, 0.4])
    config = ViewsConfig.from_augment(spec, 96, 3)
    assert config.views == (View(0.2, 0.35, 0.6, 0.25, 0.7, 0.1), View(0.2, 0.35, 0.6, 0.25, 0.3, 0.4))
    assert (config.size, config.channels, config.kernel_size) == (96, 3, 11)
    assert ViewsConfig.from_augment(AugmentSpec(), 224, 3) == ViewsConfig()  # the spec's defaults are the paper's
    assert ViewsConfig.from_augment(AugmentSpec(), 28, 1).mean_std == ((0.5,), (0.5,))


def test_each_view_field_is_the_spec_field_of_its_name():
    """View's fields (the host half's, then one per op of barlow.augment.ops.OPS, in that order) are data.augment's."""
    assert [f.name for f in dataclasses.fields(View)] == list(AugmentSpec.model_fields)
    assert [f.name for f in dataclasses.fields(View)][2:] == [op.PROB for op in view_ops()]


def test_host_half_draws_each_view_with_its_own_crop_scale_and_flip():
    config = ViewsConfig(views=(View(min_scale=1.0, flip_prob=1.0), View(min_scale=0.08, flip_prob=0.0)))
    draws = config.host_draws(3)
    for i in range(50):
        boxes, flips = draws.one(i, 200, 150)
        assert flips == [True, False]
        _, _, h, w = boxes[0]
        assert h * w >= 0.98 * 200 * 150  # min_scale 1: the whole image
    assert len({tuple(draws.one(i, 200, 150)[0][1]) for i in range(50)}) > 40  # view 2 draws a box per image


@pytest.mark.parametrize("config", [ViewsConfig(), ViewsConfig(views=(View(min_scale=0.5, flip_prob=0.3),
                                                                       View(min_scale=1.0, flip_prob=1.0)))])
def test_host_draws_per_image_and_per_batch_agree_bit_for_bit(config):
    """cpu decode draws each image's boxes as it decodes it (`one`), gpu decode the whole batch in the collate
    (`batch`): the same seed gives the same boxes and flips, in any order of the images, including sizes that take
    the centre-crop fallback (300x5) or fit no box but 1 px."""
    rng = np.random.default_rng(0)
    n = 400
    widths, heights = rng.integers(1, 700, n), rng.integers(1, 700, n)
    widths[:30], heights[:30] = 300, 5
    widths[30:40], heights[30:40] = 1, 1
    for seed in range(5):
        order = rng.permutation(n)
        boxes, flips = HostDraws(config, seed).batch(order, widths[order], heights[order])
        per_image = HostDraws(config, seed)
        for k in rng.permutation(n)[:150]:  # rows are asked for out of order: chunks must not change them
            i = int(order[k])
            want_boxes, want_flips = per_image.one(i, int(widths[i]), int(heights[i]))
            assert [tuple(b) for b in boxes[:, k].tolist()] == want_boxes and flips[:, k].tolist() == want_flips
    assert boxes.shape == (2, n, 4) and boxes.dtype == np.int64 and flips.dtype == np.bool_
    assert np.all(boxes[..., 0] + boxes[..., 2] <= heights[order]) and np.all(boxes[..., 2:] >= 1)


def test_bad_image_type_is_named():
    with pytest.raises(TypeError, match="image"):
        TwoViews(32)(np.zeros((32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("shape", [(3, 224, 224), (1, 28, 28), (3, 37, 50), (3, 5, 6)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_fast_blur_equals_torchvision_blur(shape, dtype, sigma):
    from torchvision import tv_tensors

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    img = tv_tensors.Image(pixels if dtype == torch.uint8 else pixels.float() / 255)
    k = blur_kernel_size(max(shape[1:]))
    expected = v2.functional.gaussian_blur(img, [k, k], [sigma, sigma])
    got = GaussianBlur(k, sigma=(sigma, sigma)).transform(img, {"sigma": [sigma, sigma]})
    assert type(got) is type(expected) and got.dtype == expected.dtype and got.shape == expected.shape
    tolerance = 1.0 if dtype == torch.uint8 else 1e-5  # uint8: the same value up to rounding
    assert (got.float() - expected.float()).abs().max() <= tolerance
    assert not torch.equal(got, img) or sigma == 0.1  # it really blurs
