"""A pod whose image is older than the CLI that rendered its spec fails with one line naming both versions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from barlow import __version__
from barlow.spec import RENDERED_BY_ENV, SPEC_ENV

SPEC = {"kind": "pretrain", "name": "skew", "data": {"train": "d/train", "val": "d/val"}, "output": {"url": "runs/s"},
        "optim": {"epochs": 2, "warmup_epochs": 1, "batch_size": 64}}


def _entrypoint(spec: dict, rendered_by: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != RENDERED_BY_ENV}
    env[SPEC_ENV] = yaml.safe_dump(spec)
    if rendered_by:
        env[RENDERED_BY_ENV] = rendered_by
    return subprocess.run([sys.executable, "-m", "barlow.entrypoint"], env=env, capture_output=True, text=True, timeout=120)


def test_an_unknown_field_from_a_newer_cli_names_both_versions():
    newer = {**SPEC, "cluster": {"future_field": 1}, "optim": {**SPEC["optim"], "future_knob": 2}}
    result = _entrypoint(newer, "9.9.9")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error (rank 0): this spec was rendered by barlow 9.9.9, but the image runs barlow {__version__}, which does "
        f"not know cluster.future_field, optim.future_knob: build and push an image of barlow 9.9.9 (make image) or "
        f"render with barlow {__version__}"]


@pytest.mark.parametrize("rendered_by", [None, __version__])
def test_same_version_or_unknown_renderer_keeps_the_field_errors(rendered_by):
    result = _entrypoint({**SPEC, "cluster": {"future_field": 1}}, rendered_by)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error (rank 0): cluster.future_field: unknown field"]
