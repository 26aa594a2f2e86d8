"""A view op added the documented way (barlow.augment.ops): its module, its line at the end of `OPS`, and its
probability field in the spec's AugmentSpec; the views are then built from a spec in a fresh process on the copy."""

from __future__ import annotations

import torch

from barlow.augment import DeviceViews, ViewsConfig
from barlow.spec import AugmentSpec

TOY = '''"""Invert (a toy op): 1 - x on the samples drawn, p = invert_prob."""

from __future__ import annotations

import torch

from barlow.augment.ops import mask

PROB = "invert_prob"
DEFAULTS = (0.0, 0.0)
PARAMS = ("invert",)


def draw(n: int, p: float, config, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    return (mask(n, p, g),)


def apply(views, x: torch.Tensor, p, f: dict[str, torch.Tensor]) -> torch.Tensor:
    return views.on(x, p.invert, lambda t: 1.0 - t)
'''

SIZE, SEED = 16, 5


def pixels() -> torch.Tensor:
    return torch.randint(0, 256, (12, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


RUN = f'''
import dataclasses
import torch
from barlow.augment import DeviceViews, ViewParams, ViewsConfig
from barlow.spec import AugmentSpec

assert "invert" in [f.name for f in dataclasses.fields(ViewParams)]
x = torch.randint(0, 256, (12, 3, {SIZE}, {SIZE}), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
out = {{}}
for p in (0.0, 1.0):
    views = DeviceViews(ViewsConfig.from_augment(AugmentSpec(invert_prob=p), {SIZE}, 3))  # BYOL's views + the toy
    assert [v.invert_prob for v in views.config.views] == [p, p]
    assert views.draw_view(12, {SEED}, 1).invert.float().mean().item() == p
    out[str(p)] = torch.stack(views(x, x, seed={SEED}))
torch.save(out, "views.pt")
'''


def test_a_toy_view_op_is_its_module_and_two_registrations(package_copy):
    package_copy.add_module("barlow/augment/ops/invert.py", TOY)
    package_copy.register("barlow/augment/ops/__init__.py", '"barlow.augment.ops.solarize",',
                          '    "barlow.augment.ops.invert",')
    # the module that defines AugmentSpec (barlow/spec.py, or a file of the spec package), anchored on a field line
    spec = next(p for p in sorted((package_copy.root / "barlow").rglob("*.py")) if "class AugmentSpec(" in p.read_text())
    package_copy.register(str(spec.relative_to(package_copy.root)), "    solarize_prob:",
                          '    invert_prob: float = Field(0.0, ge=0, le=1, description="Invert probability (both views).")')
    package_copy.check_cost()
    package_copy.run(RUN)

    out = torch.load(package_copy.root / "views.pt", weights_only=True)
    unmodified = torch.stack(DeviceViews(ViewsConfig.from_augment(AugmentSpec(), SIZE, 3))(pixels(), pixels(), seed=SEED))
    assert torch.equal(out["0.0"], unmodified)  # p = 0: the other ops' draws and results are untouched
    mean, std = (torch.tensor(t).view(1, 1, 3, 1, 1) for t in ViewsConfig().mean_std)
    inverted = out["1.0"] * std + mean  # back to [0, 1] pixels
    torch.testing.assert_close(inverted, 1.0 - (unmodified * std + mean), atol=1e-5, rtol=0)  # p = 1: every sample
    assert (inverted - (unmodified * std + mean)).abs().amax() > 0.5
