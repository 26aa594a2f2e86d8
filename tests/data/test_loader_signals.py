"""Loader workers outlive the run's stop signal: torchrun sends it to each training process's whole process group
(a preemption, a node drain, Ctrl-C), and the training process must still get its batches until its agreed stop
step and checkpoint. A real process in a session of its own signals its own group, as torchrun does."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from imagesets import write_tagged_folder

from barlow.data.shards import write_shards

TRAINER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from barlow.data import open_source
    from barlow.augment import ImageTransform
    from barlow.spec import DataSpec

    got = []
    for s in (signal.SIGTERM, signal.SIGINT):  # the training process's stop flag (barlow.entrypoint)
        signal.signal(s, lambda signum, frame: got.append(signum))
    source = open_source(DataSpec(format=sys.argv[1], train=sys.argv[2]), "train")
    served = []
    for epoch, signum in enumerate((signal.SIGTERM, signal.SIGINT)):
        loader = source.loader(transform=ImageTransform(lambda img: torch.zeros(1), 3), batch_size=4, rank=0,
                               world_size=1, seed=0, epoch=epoch, workers=2)
        batches = iter(loader)
        os.killpg(0, signum)  # while the workers start (epoch 0) and while they serve (epoch 1)
        served.append(sum(1 for _ in batches) == len(loader))
    print(served, [int(s) for s in got])
""")


@pytest.mark.parametrize("data_format", ["imagefolder", "shards"])
def test_loader_workers_outlive_a_stop_signal_to_the_process_group(tmp_path, data_format):
    write_tagged_folder(tmp_path / "train", 64)
    url = str(tmp_path / "train")
    if data_format == "shards":
        write_shards(url, str(tmp_path / "shards"), shard_size=10240, workers=1, progress=False)
        url = str(tmp_path / "shards" / "index.json")
    result = subprocess.run([sys.executable, "-c", TRAINER, data_format, url], capture_output=True, text=True,
                            timeout=120, start_new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[True, True] [15, 2]"  # every batch served, both signals reached the trainer
    assert "Traceback" not in result.stderr, result.stderr
