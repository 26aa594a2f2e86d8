"""Barlow Twins pretraining: load, loop, step, save. Runs in every torchrun process, locally or in a pod."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from barlow import checkpoint, distributed, storage
from barlow.data import open_source
from barlow.data.feed import TrainingFeed
from barlow.loss import BarlowTwinsLoss, cross_correlation
from barlow.metrics import Metrics, save_heatmap
from barlow.model import BarlowTwins
from barlow.optim import LARS, WarmupCosine, param_groups
from barlow.spec import PretrainSpec


class Stopped(Exception):
    """Training stopped early on a signal, after writing a checkpoint."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} at step {step}, after a checkpoint")
        self.signum, self.step = signum, step


class DataError(Exception):
    """The data cannot feed this run (too few images, unreadable source)."""


def build_model(spec: PretrainSpec, place: distributed.Placement) -> nn.Module:
    m = spec.model
    model = BarlowTwins(m.arch, m.projector, m.small_images, m.width, in_channels=spec.data.channels)
    if place.device.type == "cuda" and place.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics of the global batch, as in the paper
    model = model.to(place.device)
    return model.to(memory_format=torch.channels_last) if place.autocast_dtype else model


def pretrain(spec: PretrainSpec, stop_signal: Callable[[], int | None] = lambda: None) -> dict:
    """Pretrain to the end of the spec's schedule, resuming from the latest complete checkpoint; returns a summary."""
    place = distributed.setup(spec.runtime)
    storage.configure_s3(storage.S3Settings(**spec.data.s3.model_dump()))
    torch.manual_seed(spec.runtime.seed)
    o, out = spec.optim, spec.output.url

    source = open_source(spec.data, "train")
    steps_per_epoch = source.num_samples // o.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"data.train: {source.num_samples} images are fewer than one global batch "
                        f"(optim.batch_size = {o.batch_size})")
    total_steps = steps_per_epoch * o.epochs
    per_rank = o.batch_size // place.world_size

    model = build_model(spec, place)
    optimizer = LARS(param_groups(model, o.lr_weights, o.lr_biases), lr=0.0, weight_decay=o.weight_decay, momentum=o.momentum, eta=o.lars_eta)
    schedule = WarmupCosine(round(o.warmup_epochs * steps_per_epoch), total_steps, o.batch_size)
    loss_fn = BarlowTwinsLoss(o.lambd)
    step = resume(out, model, optimizer, spec, place)
    ddp = DistributedDataParallel(model) if place.world_size > 1 else model
    try:  # host half (loader workers: crops) and device half (batched views) of the two views
        feed = TrainingFeed(spec.data, place.device)
    except ValueError as e:
        raise DataError(str(e)) from None
    metrics = Metrics(out, place.is_main, total_steps, step)
    metrics.print(f"pretrain {spec.name}: {source.num_samples} images, {steps_per_epoch} steps/epoch × {o.epochs} epochs, "
                  f"{place.world_size} process(es) on {place.device.type}"
                  f"{', bf16' if place.autocast_dtype else ''}{f', resuming at step {step}' if step else ''}")
    autocast = (torch.autocast(place.device.type, dtype=place.autocast_dtype) if place.autocast_dtype else nullcontext())
    z1 = z2 = None
    tick, tick_step, corrupt = time.perf_counter(), step, 0
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        batches = source.loader(transform=feed.transform, batch_size=per_rank, rank=place.rank, world_size=place.world_size,
                                seed=spec.runtime.seed, epoch=epoch, start_step=in_epoch, workers=spec.data.workers,
                                pin_memory=feed.pin_memory)
        for x1, x2, n_corrupt in feed(batches):  # device views, channels_last, the next batch already copying
            schedule.apply(optimizer, step)
            with autocast:
                z1, z2 = ddp(x1, x2)
            loss = loss_fn(z1, z2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            corrupt += int(n_corrupt)
            if step % spec.runtime.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                skipped = distributed.all_sum([corrupt], place.device)[0]
                metrics.log(step, {"epoch": epoch + (in_epoch + 1) / steps_per_epoch, "loss": loss.item(),
                                   "on_diag": loss_fn.on_diag.item(), "off_diag": loss_fn.off_diag.item(),
                                   "lr": optimizer.param_groups[0]["lr"], "corrupt_images": skipped,
                                   "images_per_s": (step - tick_step) * o.batch_size / (now - tick)})
                tick, tick_step = now, step
            else:
                metrics.advance(step)
            in_epoch += 1
            signum = stop_signal()
            stopping = distributed.any_rank(signum is not None, place.device)
            if stopping or step % spec.output.checkpoint_every == 0 or step == total_steps:
                save(out, step, model, optimizer, spec, place)
                metrics.sync()
            if stopping:
                metrics.close()
                raise Stopped(signum or 15, step)
    summary = finish(spec, model, z1, z2, place, step)
    metrics.close()
    return summary


def resume(out: str, model: nn.Module, optimizer: torch.optim.Optimizer, spec: PretrainSpec,
           place: distributed.Placement) -> int:
    """Load the latest complete checkpoint, if any; returns the step to continue from."""
    if place.is_main:
        checkpoint.remove_incomplete(out)
    distributed.barrier()
    url = checkpoint.latest(out)
    if url is None:
        return 0
    state = checkpoint.load(url)
    if state["arch"] != spec.model.model_dump(mode="json") or state["batch_size"] != spec.optim.batch_size:
        raise DataError(f"output.url: {url} holds a run with another model or batch size; use a new output.url")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    return int(state["step"])


def save(out: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, spec: PretrainSpec,
         place: distributed.Placement) -> None:
    """Write a checkpoint from the main rank; every rank waits so none exits while it is being written."""
    if place.is_main:
        state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng_cpu": torch.get_rng_state(), "arch": spec.model.model_dump(mode="json"),
                 "batch_size": spec.optim.batch_size, "spec_hash": spec.spec_hash()}
        checkpoint.save(out, step, state, spec.output.keep)
    distributed.barrier()


def finish(spec: PretrainSpec, model: nn.Module, z1: torch.Tensor | None, z2: torch.Tensor | None,
           place: distributed.Placement, step: int) -> dict:
    """Export the backbone as a plain torchvision ResNet state_dict and draw the cross-correlation matrix."""
    out = spec.output.url
    c = cross_correlation(z1.detach(), z2.detach()) if z1 is not None else None
    summary = {"name": spec.name, "steps": step, "backbone": storage.join(out, "backbone.pt")}
    if place.is_main:
        buf = io.BytesIO()
        torch.save({k: v.cpu() for k, v in model.backbone.state_dict().items()}, buf)
        storage.write_bytes(summary["backbone"], buf.getvalue())
        if c is not None:
            save_heatmap(c, storage.join(out, "cross_correlation.png"))
            summary["on_diag_mean"] = float(c.diagonal().mean())
            summary["off_diag_abs_mean"] = float((c - torch.diag_embed(c.diagonal())).abs().mean())
        storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=2))
    distributed.barrier()
    return summary
