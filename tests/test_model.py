"""Backbone (torchvision layout at every width, zero-init residuals, stems), projector structure, per-view forward."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from barlow.model import ARCHS, BarlowTwins, build_backbone, build_projector


def test_default_resnet50_exports_into_torchvision_with_only_fc_missing():
    backbone = build_backbone("resnet50")
    assert backbone.feature_dim == 2048 and isinstance(backbone.fc, nn.Identity)
    sd = backbone.state_dict()
    assert not any(k.startswith("fc.") for k in sd)
    target = torchvision.models.resnet50()
    result = target.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    torch.testing.assert_close(target.layer4[2].conv3.weight, backbone.layer4[2].conv3.weight)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("width,small_images,in_channels", [(64, False, 3), (16, True, 1), (24, False, 3)])
def test_every_width_keeps_torchvision_key_names(arch, width, small_images, in_channels):
    with torch.device("meta"):  # layout only: no memory, no init cost
        ours = build_backbone(arch, small_images=small_images, width=width, in_channels=in_channels)
        ref = torchvision.models.get_model(arch)
    assert set(ours.state_dict()) == set(ref.state_dict()) - {"fc.weight", "fc.bias"}
    expansion = ARCHS[arch][0].expansion
    assert ours.feature_dim == 8 * width * expansion
    assert ours.conv1.in_channels == in_channels and ours.conv1.out_channels == width
    assert ours.layer4[-1].conv1.in_channels == 8 * width * expansion


@pytest.mark.parametrize("arch,width,dim", [("resnet18", 64, 512), ("resnet18", 16, 128), ("resnet50", 16, 512),
                                            ("wide_resnet50_2", 8, 256)])
def test_forward_gives_feature_dim_features(arch, width, dim):
    backbone = build_backbone(arch, small_images=True, width=width).eval()
    assert backbone.feature_dim == dim
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_wide_resnet_bottlenecks_are_twice_as_wide_at_any_width():
    with torch.device("meta"):
        plain, wide = build_backbone("resnet50", width=16), build_backbone("wide_resnet50_2", width=16)
    assert plain.layer1[0].conv2.out_channels == 16 and wide.layer1[0].conv2.out_channels == 32
    assert plain.feature_dim == wide.feature_dim == 512


@pytest.mark.parametrize("arch,width,small_images", [("resnet50", 64, False), ("resnet18", 64, False), ("resnet50", 8, True),
                                                     ("resnet34", 8, False)])
def test_zero_init_residual_zeroes_only_the_last_bn_of_each_block(arch, width, small_images):
    backbone = build_backbone(arch, width=width, small_images=small_images)
    blocks = [m for m in backbone.modules() if isinstance(m, BasicBlock | Bottleneck)]
    assert len(blocks) == sum(ARCHS[arch][1])
    for block in blocks:
        last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        assert torch.count_nonzero(last.weight) == 0
        assert torch.all(block.bn1.weight == 1) and block.conv1.weight.std() > 0
    assert torch.all(backbone.bn1.weight == 1)


def test_small_images_stem_keeps_resolution():
    seen = {}
    for small in (False, True):
        backbone = build_backbone("resnet18", small_images=small, width=8).eval()
        backbone.layer1.register_forward_hook(lambda m, i, o, small=small: seen.__setitem__(small, o.shape[-1]))
        backbone(torch.randn(1, 3, 32, 32))
    small = build_backbone("resnet18", small_images=True, width=8)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    assert seen == {False: 8, True: 32}


def test_grayscale_input_channel():
    backbone = build_backbone("resnet18", width=8, in_channels=1, small_images=True).eval()
    assert backbone.conv1.weight.shape == (8, 1, 3, 3)
    assert backbone(torch.randn(2, 1, 28, 28)).shape == (2, 64)


@pytest.mark.parametrize("kwargs,field", [(dict(arch="resnet51"), "arch"), (dict(in_channels=2), "in_channels"),
                                          (dict(width=0), "width")])
def test_bad_backbone_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_backbone(**kwargs)


def test_projector_structure_small():
    proj = build_projector(16, "32-24-8")
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 24), (24, 8)]
    assert all(m.bias is None for m in linears)
    assert [m.num_features for m in proj if isinstance(m, nn.BatchNorm1d)] == [32, 24]
    assert proj(torch.randn(4, 16)).shape == (4, 8)


def test_single_width_projector_is_one_linear():
    proj = build_projector(16, "8")
    assert len(proj) == 1 and proj[0].weight.shape == (8, 16) and proj[0].bias is None


def test_paper_projector_shapes_without_allocating():
    with torch.device("meta"):
        proj = build_projector(2048, "8192-8192-8192")
    shapes = [tuple(p.shape) for p in proj.parameters()]
    assert shapes == [(8192, 2048), (8192,), (8192,), (8192, 8192), (8192,), (8192,), (8192, 8192)]


@pytest.mark.parametrize("spec", ["", "8192-", "a-b", "0-8", "8,8"])
def test_bad_projector_spec_names_the_field(spec):
    with pytest.raises(ValueError, match="projector"):
        build_projector(16, spec)


def test_views_go_through_the_model_separately():
    torch.manual_seed(0)
    model = BarlowTwins("resnet18", "32-16", small_images=True, width=8).train()
    assert model.embed_dim == 16
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    z1, z2 = model(x1, x2)
    assert z1.shape == z2.shape == (4, 16)
    # With per-view BatchNorm statistics, view 1's projection cannot depend on view 2's images.
    z1_other, _ = model(x1, torch.randn(4, 3, 16, 16) * 5 + 3)
    torch.testing.assert_close(z1_other, z1)
    torch.testing.assert_close(z1, model.projector(model.backbone(x1)))


def test_the_specs_arch_names_are_the_ones_the_model_builds():
    """model.arch's values are written twice (the spec imports no torch): the two lists must not drift."""
    from barlow.spec import ARCHS as SPEC_ARCHS

    assert list(SPEC_ARCHS) == list(ARCHS)
