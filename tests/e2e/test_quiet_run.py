"""A healthy run says nothing it need not: a small demo-like `barlow run` (two CPU processes, so both DDPs, the
model's and the online probe's, are built; float32, the feed's channels-last views) prints no Python warning."""

from __future__ import annotations

import re

from runner import barlow, tiny_spec, write_spec

WARNING = re.compile(r"\w*Warning\b|grad strides do not match|broadcast_buffers")


def test_a_demo_like_run_prints_no_warning(demo_data, tmp_path):
    spec = write_spec(tmp_path, tiny_spec(demo_data, tmp_path / "run", **{"optim.epochs": 2, "data.val": None,
                                                                          "runtime.precision": "fp32"}))
    result = barlow("run", "pretrain", str(spec), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = [line for line in (result.stdout + result.stderr).splitlines() if WARNING.search(line)]
    assert found == [], "\n".join(found)
