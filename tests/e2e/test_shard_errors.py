"""A broken shard in a run of 2 processes x 2 loader workers: one line naming the shard, exit 1; the other process,
whose peer went away, adds nothing (no gloo error, no traceback), and neither does torchrun."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import pytest
from runner import barlow, tiny_spec, write_spec

from barlow.data.shards import write_shards

pytestmark = pytest.mark.slow


def _missing(shard: Path) -> None:
    shard.unlink()


def _truncated(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])


def _without_labels(shard: Path) -> None:
    """The shard rewritten as a WebDataset tar of images only (no .cls members)."""
    out = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src:
            if not member.name.endswith(".cls"):
                dst.addfile(member, src.extractfile(member))
    shard.write_bytes(out.getvalue())


@pytest.mark.parametrize("damage, message", [
    pytest.param(_missing, r"{shard}: shard shard-000001.tar listed in {index} is missing", id="missing"),
    pytest.param(_truncated, r"{shard}: ", id="truncated"),
    pytest.param(_without_labels, r"{shard}: sample .* lacks a .cls member", id="without-labels"),
])
def test_a_broken_shard_is_one_line_naming_it(demo_data, tmp_path, damage, message):
    shards = tmp_path / "shards"
    write_shards(str(demo_data / "train"), str(shards), shard_size=40000, workers=1, progress=False)
    shard, index = shards / "shard-000001.tar", shards / "index.json"
    damage(shard)
    spec = tiny_spec(demo_data, tmp_path / "run", **{"data.workers": 2, "monitor.online_probe": "off"})
    spec["data"].update(format="shards", train=str(index))
    del spec["data"]["val"]
    result = barlow("run", "pretrain", str(write_spec(tmp_path, spec)))
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, result.stderr[-3000:]
    assert re.fullmatch(r"error \(rank [01]\): " + message.format(shard=re.escape(str(shard)), index=re.escape(str(index))) + ".*",
                        lines[0]), lines[0]
    assert lines[1] == "error: pretrain 'tiny' exited with code 1"
