"""CUDA: the pretraining steps between log steps, the feed's uploads and the device views included, queue their
work and never make the host wait for the GPU. (data.decode: cpu here: the GPU decode synchronises its stream once a
batch on purpose, before nvJPEG writes; see barlow/data/devicedecode.py.)
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_train_steps_between_log_steps_do_not_sync(tmp_path):
    from imagesets import write_jpeg_folder

    from barlow.spec import parse_spec
    from barlow.train import Interval, device_batches, log_step, set_up, train_step

    write_jpeg_folder(tmp_path / "demo" / "train", 320)  # 5 batches of 64; no scikit-learn (the GPU image has none)
    spec = parse_spec({"kind": "pretrain", "name": "syncs",
                       "data": {"train": str(tmp_path / "demo" / "train"), "image_size": 16, "workers": 0,
                                "decode": "cpu"},
                       "model": {"arch": "resnet18", "small_images": True, "width": 8, "projector": "128-128-128"},
                       "optim": {"epochs": 1, "batch_size": 64, "warmup_epochs": 1},
                       "runtime": {"device": "cuda", "log_every": 1000},
                       "output": {"url": str(tmp_path / "out")}})
    run = set_up(spec)
    batches = device_batches(spec, run.source, run.place, 0, run.steps_per_epoch)
    first = next(batches)
    loss_sum = torch.zeros((), device=run.place.device)
    train_step(run, first.x1, first.x2, first.labels)  # the first step may allocate and pick kernels (cudnn.benchmark)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync inside raises: the feed and views count too
    try:
        for _ in range(3):
            batch = next(batches)
            loss, _, _ = train_step(run, batch.x1, batch.x2, batch.labels)
            run.position.step += 1
            loss_sum += loss.detach()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    log_step(run, run.position.step, loss_sum / 3, torch.zeros((), device=run.place.device), Interval(64))
    assert torch.isfinite(loss_sum)
