"""Barlow Twins pretraining, run in every torchrun process (locally or in a pod): set up, loop `train_step`, finish.

Host syncs are deliberate: a step queues its work on the device and returns; values are read on the host only at
log steps, at checkpoint steps, and where a stop signal is agreed on (each such place is marked `# sync:`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from barlow import distributed, progress, runsetup, storage
from barlow.checkpoint import Checkpointer
from barlow.data import open_source
from barlow.data.feed import TrainingFeed
from barlow.errors import StoppedOnSignal, TooFewImages, WrongPlacement
from barlow.loss import BarlowTwinsLoss, cross_correlation
from barlow.metrics import Metrics, save_heatmap
from barlow.model import BarlowTwins
from barlow.optim import LARS, WarmupCosine, param_groups
from barlow.spec import PretrainSpec, RuntimeSpec

Batch = tuple[torch.Tensor, torch.Tensor, "int | torch.Tensor"]  # (view 1, view 2, corrupt images replaced)


@dataclass
class Position:
    """The data position: optimizer steps taken (epoch and batch within it follow from the global batch)."""

    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class RNG:
    """The process's random generators (CPU, and this GPU's); augmentation is seeded per batch from (seed, epoch, rank, batch)."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


@dataclass
class Run:
    """Everything set-up builds and the loop uses."""

    spec: PretrainSpec
    place: distributed.Placement
    s3: storage.S3Settings  # the run's S3 settings, for every storage call (built once, by runsetup.start)
    source: Any
    steps_per_epoch: int
    total_steps: int
    model: nn.Module  # the plain model: its state_dict is what checkpoints and exports hold
    forward: nn.Module  # what a step calls: the model, wrapped in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    loss_fn: BarlowTwinsLoss
    autocast: AbstractContextManager
    position: Position
    checkpointer: Checkpointer
    metrics: Metrics

    @property
    def proc(self) -> runsetup.Process:
        """The process's placement and S3 settings, as evaluation's helpers (`evaluate.features_of`) take them."""
        return runsetup.Process(self.place, self.s3)


class Interval:
    """The steps since the last log step and when that log step's work was done; `images_per_s()` is called after
    the log step's sync, so the rate covers exactly the device work of its own interval."""

    def __init__(self, batch_size: int):
        self.batch_size, self.steps, self.start = batch_size, 0, time.perf_counter()

    def images_per_s(self) -> float:
        """The interval's rate; starts the next interval."""
        now = time.perf_counter()
        rate = self.steps * self.batch_size / max(now - self.start, 1e-9)
        self.steps, self.start = 0, now
        return rate


def pretrain(spec: PretrainSpec, stop_signal: runsetup.StopSignal = lambda: None) -> dict:
    """Pretrain to the end of the spec's schedule, resuming from the latest complete checkpoint; returns a summary."""
    run = set_up(spec)
    place, log_every, total = run.place, spec.runtime.log_every, run.total_steps
    loss_sum = torch.zeros((), device=place.device)  # per-step values stay on the device between log steps
    corrupt = torch.zeros((), device=place.device, dtype=torch.float64)
    interval = Interval(spec.optim.batch_size)
    z1 = z2 = None
    for x1, x2, n_corrupt in device_batches(spec, run.source, place, run.position.step, run.steps_per_epoch):
        loss, z1, z2 = train_step(run, x1, x2)
        run.position.step += 1
        step = run.position.step
        interval.steps += 1
        loss_sum += loss.detach()
        corrupt += n_corrupt
        at_log, at_checkpoint = step % log_every == 0 or step == total, run.checkpointer.due(step, total)
        if at_log:
            log_step(run, step, loss_sum / interval.steps, corrupt, interval)
            loss_sum.zero_()
        else:
            run.metrics.advance(step)
        # A single process reads its flag every step for free; several agree on it only at log/checkpoint steps.
        if place.world_size == 1 or at_log or at_checkpoint:
            signum = runsetup.agreed_stop(stop_signal, place)
        else:
            signum = None
        if at_checkpoint or signum is not None:
            run.checkpointer.save(step)
            run.metrics.sync()
        if signum is not None:
            run.metrics.close()
            raise StoppedOnSignal(signum, f"step {step}")
    return finish(run, z1, z2)


def set_up(spec: PretrainSpec) -> Run:
    """Join the process group, open the data, build model, optimizer, schedule and loss, resume if a checkpoint exists."""
    proc = runsetup.start(spec)
    place = proc.place
    o = spec.optim
    source = open_source(spec.data, "train")
    steps_per_epoch = source.num_samples // o.batch_size
    if steps_per_epoch == 0:
        raise TooFewImages(f"data.train: {source.num_samples} images are fewer than one global batch "
                           f"(optim.batch_size = {o.batch_size})")
    total_steps = steps_per_epoch * o.epochs
    model = build_model(spec, place)
    optimizer = LARS(param_groups(model, o.lr_weights, o.lr_biases), lr=0.0, weight_decay=o.weight_decay, momentum=o.momentum,
                     eta=o.lars_eta)
    position = Position()
    record = run_record(spec, place)
    checkpointer = Checkpointer(spec.output.url, every=spec.output.checkpoint_every, keep=spec.output.keep,
                                is_main=place.is_main, run=record.as_dict(), s3=proc.s3,
                                parts={"model": model, "optimizer": optimizer, "data": position, "rng": RNG(place.device)})
    checkpointer.resume(record.check)
    metrics = Metrics(spec.output.url, place.is_main, total_steps, position.step, s3=proc.s3)
    if place.is_main:
        progress.record_run(spec, total_steps, steps_per_epoch, o.batch_size, proc.s3)  # what `barlow status` reads
    metrics.print(f"pretrain {spec.name}: {source.num_samples} images, {steps_per_epoch} steps/epoch × {o.epochs} epochs, "
                  f"{place.world_size} process(es) on {place.device.type}{', bf16' if place.autocast_dtype else ''}"
                  f"{resume_note(record, checkpointer.resumed_run, position.step)}")
    return Run(spec, place, proc.s3, source, steps_per_epoch, total_steps, model,
               wrap_for_speed(model, spec.runtime, place), optimizer,
               WarmupCosine(round(o.warmup_epochs * steps_per_epoch), total_steps, o.batch_size),
               BarlowTwinsLoss(o.lambd), proc.autocast(), position, checkpointer, metrics)


def build_model(spec: PretrainSpec, place: distributed.Placement) -> nn.Module:
    m = spec.model
    model = BarlowTwins(m.arch, m.projector, m.small_images, m.width, in_channels=spec.data.channels)
    if place.device.type == "cuda" and place.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics of the global batch, as in the paper
    model = model.to(place.device)
    return model.to(memory_format=torch.channels_last) if place.autocast_dtype else model


def wrap_for_speed(model: nn.Module, runtime: RuntimeSpec, place: distributed.Placement) -> nn.Module:
    """DDP (runsetup.wrap_ddp), then torch.compile where `runtime.compile` asks for it."""
    wrapped = runsetup.wrap_ddp(model, place)
    return torch.compile(wrapped) if compile_enabled(runtime, place.device) else wrapped


def compile_enabled(runtime: RuntimeSpec, device: torch.device) -> bool:
    """runtime.compile: on / off as given; auto is off until bench/gpu.py shows compile wins on CUDA (and the CPU)."""
    return runtime.compile == "on"


def device_batches(spec: PretrainSpec, source: Any, place: distributed.Placement, start_step: int,
                   steps_per_epoch: int) -> Iterator[Batch]:
    """This rank's `(x1, x2, n_corrupt)` on the device, from global step `start_step` to the end of training: loader
    workers read and crop on the host, the rest of the two views runs batched on the device (barlow.data.feed)."""
    try:
        feed = TrainingFeed(spec.data, place.device)
    except ValueError as e:  # data.decode: gpu on a process without CUDA
        raise WrongPlacement(str(e)) from None
    first_epoch, in_epoch = divmod(start_step, steps_per_epoch)
    for epoch in range(first_epoch, spec.optim.epochs):
        batches = source.loader(transform=feed.transform, batch_size=spec.optim.batch_size // place.world_size,
                                rank=place.rank, world_size=place.world_size, seed=spec.runtime.seed, epoch=epoch,
                                start_step=in_epoch, workers=spec.data.workers, pin_memory=feed.pin_memory)
        yield from feed(batches)  # device views, channels_last, the next batch already copying
        in_epoch = 0


def train_step(run: Run, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on one batch of view pairs; returns the loss and the embeddings, still on the device."""
    run.schedule.apply(run.optimizer, run.position.step)
    with run.autocast:
        z1, z2 = run.forward(x1, x2)
    loss = run.loss_fn(z1, z2)  # float32 even under autocast
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return loss, z1.detach(), z2.detach()


def log_step(run: Run, step: int, mean_loss: torch.Tensor, corrupt: torch.Tensor, interval: Interval) -> None:
    """One metrics line; the only place the loop reads device values."""
    values = torch.stack([mean_loss.float(), run.loss_fn.on_diag, run.loss_fn.off_diag]).tolist()  # sync: log step
    skipped = distributed.all_sum([corrupt], run.place.device)[0]  # sync: the ranks' counts, at the log step
    images_per_s = interval.images_per_s()  # after the syncs: the interval's device work is done
    epoch = step / run.steps_per_epoch
    run.metrics.log(step, {"epoch": epoch, "loss": values[0], "on_diag": values[1], "off_diag": values[2],
                           "lr": run.optimizer.param_groups[0]["lr"], "corrupt_images": skipped,
                           "images_per_s": images_per_s})


def run_record(spec: PretrainSpec, place: distributed.Placement) -> runsetup.RunRecord:
    """What a resume is checked against: the same model at the same global batch (else the output holds another
    run); the world size, loader workers and seed may change, and the resume says so (the data order changes)."""
    return runsetup.RunRecord(
        fixed={"model": spec.model.model_dump(mode="json"), "batch_size": spec.optim.batch_size},
        noted={"world_size": place.world_size, "workers": spec.data.workers, "seed": spec.runtime.seed},
        fields={"batch_size": "optim.batch_size", "workers": "data.workers", "seed": "runtime.seed"})


def resume_note(record: runsetup.RunRecord, saved: dict[str, Any] | None, step: int) -> str:
    if saved is None:
        return ""
    note = f", resuming at step {step}"
    changed = record.changes(saved)
    if changed:
        note += (f" ({', '.join(changed)}: same global batch and schedule; the data order is exact only with "
                 f"the same world size, loader workers and seed)")
    return note


def finish(run: Run, z1: torch.Tensor | None, z2: torch.Tensor | None) -> dict:
    """Export the backbone as a plain torchvision ResNet state_dict and draw the cross-correlation matrix."""
    spec, place, out = run.spec, run.place, run.spec.output.url
    c = cross_correlation(z1.detach(), z2.detach()) if z1 is not None else None
    summary = {"name": spec.name, "steps": run.position.step, "backbone": storage.join(out, "backbone.pt")}
    if place.is_main:
        backbone = {k: v.cpu() for k, v in run.model.backbone.state_dict().items()}
        storage.write_with(summary["backbone"], lambda f: torch.save(backbone, f), run.s3)
        if c is not None:  # sync: once, at the end
            save_heatmap(c, storage.join(out, "cross_correlation.png"), s3=run.s3)
            summary["on_diag_mean"] = float(c.diagonal().mean())
            summary["off_diag_abs_mean"] = float((c - torch.diag_embed(c.diagonal())).abs().mean())
        storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=2), run.s3)
    run.metrics.close()
    distributed.barrier()
    return summary
