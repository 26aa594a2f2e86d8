"""Measured training throughput, for `barlow plan`'s wall-time and GPU-hour estimates.

One row per (GPU model, encoder, image size), measured by `bench/gpu/gpu.py` on a lent GPU machine. To add a row, copy
the last line of the GPU kit's report.md (`bench/gpu.sh`: its "Numbers to take" table writes the row out, from the
shard-fed rate) into MEASURED:

    Measured(gpu="NVIDIA-H100-80GB-HBM3", arch="resnet50", image_size=224, precision="bf16",
             images_per_s_per_gpu=1234.0, source="bench/gpu/gpu.py, 2026-12-01, 1 GPU, batch 256, channels_last")

`gpu` is the node label `nvidia.com/gpu.product` (what `cluster.node_selector` names, and what `nvidia-smi
--query-gpu=name` prints with spaces as '-'); `images_per_s_per_gpu` is pretraining images (two views each) per second
per GPU in steady state. Multi-node scaling is assumed linear: the estimate is a lower bound on wall time.
No GPU has been lent to this project yet: the table is empty and `barlow plan` prints "not measured".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    gpu: str
    arch: str
    image_size: int
    precision: str
    images_per_s_per_gpu: float
    source: str  # the bench run it comes from: script, date, machine, batch per GPU


MEASURED: list[Measured] = []


def lookup(gpu: str | None, arch: str, image_size: int) -> Measured | None:
    """The measured row for this GPU model, encoder and image size, or None."""
    for row in MEASURED:
        if gpu and row.gpu.lower() == gpu.lower() and (row.arch, row.image_size) == (arch, image_size):
            return row
    return None
