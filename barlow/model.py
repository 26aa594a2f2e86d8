"""Encoder (a torchvision ResNet without its classifier) and the Barlow Twins projector.

Imports nothing of barlow.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

# arch -> (block, blocks per stage, bottleneck width per group); torchvision's own layouts.
ARCHS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int], int]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], 64),
    "resnet34": (BasicBlock, [3, 4, 6, 3], 64),
    "resnet50": (Bottleneck, [3, 4, 6, 3], 64),
    "resnet101": (Bottleneck, [3, 4, 23, 3], 64),
    "resnet152": (Bottleneck, [3, 8, 36, 3], 64),
    "wide_resnet50_2": (Bottleneck, [3, 4, 6, 3], 128),
    "wide_resnet101_2": (Bottleneck, [3, 4, 23, 3], 128),
}


class Backbone(ResNet):
    """A torchvision ResNet with `fc = Identity`; module names (and so state_dict keys) are torchvision's at every width.

    torchvision builds its 64-wide, RGB, ImageNet-stem layout; other widths, stems or input channels rebuild the
    stem and the four stages with torchvision's own `_make_layer` and initialisation.
    """

    def __init__(self, arch: str = "resnet50", small_images: bool = False, width: int = 64, in_channels: int = 3):
        if arch not in ARCHS:
            raise ValueError(f"arch: unknown '{arch}' (choose one of {', '.join(ARCHS)})")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels: must be 1 or 3 (got {in_channels})")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width: must be a positive integer (got {width!r})")
        block, layers, width_per_group = ARCHS[arch]
        if (width, in_channels, small_images) == (64, 3, False):
            super().__init__(block, layers, zero_init_residual=True, width_per_group=width_per_group)
        else:
            with torch.device("meta"):  # every parameterised module is rebuilt below: skip allocating the defaults
                super().__init__(block, layers, zero_init_residual=True, width_per_group=width_per_group)
            self._rebuild(block, layers, width, in_channels, small_images)
        self.fc = nn.Identity()
        self.arch = arch
        self.feature_dim = 8 * width * block.expansion

    def _rebuild(self, block, layers, width, in_channels, small_images) -> None:
        self.inplanes, self.dilation = width, 1
        if small_images:  # CIFAR-style stem: keep the full resolution of 28-64 px images
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(width)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        # The same initialisation torchvision gives its own layers, including zero_init_residual.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


def build_backbone(arch: str = "resnet50", small_images: bool = False, width: int = 64, in_channels: int = 3) -> nn.Module:
    """A torchvision ResNet by name, classifier replaced by Identity; `.feature_dim` is its output width."""
    return Backbone(arch, small_images=small_images, width=width, in_channels=in_channels)


def build_projector(in_dim: int, spec: str = "8192-8192-8192") -> nn.Sequential:
    """Linear(bias=False) -> BatchNorm1d -> ReLU for every layer but the last, then a final Linear(bias=False)."""
    if not re.fullmatch(r"[1-9][0-9]*(-[1-9][0-9]*)*", spec):
        raise ValueError(f"projector: must be widths joined by '-', e.g. 8192-8192-8192 (got '{spec}')")
    sizes = [in_dim] + [int(w) for w in spec.split("-")]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


class BarlowTwins(nn.Module):
    """Backbone + projector; `forward(x1, x2)` returns the projections (z1, z2) of the two views, and with
    `with_features=True` also view 1's pooled backbone features, detached (what an online probe trains on)."""

    def __init__(self, arch: str = "resnet50", projector: str = "8192-8192-8192", small_images: bool = False,
                 width: int = 64, in_channels: int = 3):
        super().__init__()
        self.backbone = build_backbone(arch, small_images=small_images, width=width, in_channels=in_channels)
        self.projector = build_projector(self.backbone.feature_dim, projector)

    @property
    def embed_dim(self) -> int:
        return self.projector[-1].out_features

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, with_features: bool = False) -> tuple[torch.Tensor, ...]:
        # Views go through separately, as in the official code: BatchNorm statistics are per view.
        h1 = self.backbone(x1)
        z1, z2 = self.projector(h1), self.projector(self.backbone(x2))
        # Detached: nothing computed from the features can reach the backbone's gradients.
        return (z1, z2, h1.detach()) if with_features else (z1, z2)
