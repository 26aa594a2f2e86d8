"""Barlow Twins pretraining, run in every torchrun process (locally or in a pod): set up, loop `train_step`, finish.

Host syncs are deliberate: a step queues its work on the device and returns; values are read on the host only at
log steps, at checkpoint steps, and where a stop signal is agreed on (each such place is marked `# sync:`).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from barlow import distributed, storage
from barlow.checkpoint import Checkpointer
from barlow.data import open_source
from barlow.data.feed import DeviceBatch, TrainingFeed
from barlow.data.source import Source
from barlow.errors import OutputHoldsAnotherRun, StoppedOnSignal, TooFewImages, WrongPlacement
from barlow.loss import BarlowTwinsLoss, cross_correlation
from barlow.metrics import Metrics, save_heatmap
from barlow.model import BarlowTwins
from barlow.optim import LARS, WarmupCosine, param_groups
from barlow.spec import PretrainSpec, RuntimeSpec


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
    source: Source
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


def pretrain(spec: PretrainSpec, stop_signal: Callable[[], int | None] = lambda: None) -> dict:
    """Pretrain to the end of the spec's schedule, resuming from the latest complete checkpoint; returns a summary."""
    run = set_up(spec)
    place, log_every, total = run.place, spec.runtime.log_every, run.total_steps
    loss_sum = torch.zeros((), device=place.device)  # per-step values stay on the device between log steps
    corrupt = torch.zeros((), device=place.device, dtype=torch.float64)
    since, tick = 0, time.perf_counter()
    z1 = z2 = None
    for batch in device_batches(spec, run.source, place, run.position.step, run.steps_per_epoch):
        loss, z1, z2 = train_step(run, batch.x1, batch.x2)
        run.position.step += 1
        step, since = run.position.step, since + 1
        loss_sum += loss.detach()
        corrupt += batch.n_corrupt
        at_log, at_checkpoint = step % log_every == 0 or step == total, run.checkpointer.due(step, total)
        if at_log:
            now = time.perf_counter()
            log_step(run, step, loss_sum / since, corrupt, images_per_s=since * spec.optim.batch_size / (now - tick))
            loss_sum.zero_()
            since, tick = 0, now
        else:
            run.metrics.advance(step)
        # A single process reads its flag every step for free; several agree on it only at log/checkpoint steps.
        signum = stop_signal() if place.world_size == 1 or at_log or at_checkpoint else None
        if place.world_size > 1 and (at_log or at_checkpoint):
            signum = signum or (15 if distributed.any_rank(signum is not None, place.device) else None)
        if at_checkpoint or signum is not None:
            run.checkpointer.save(step)
            run.metrics.sync()
        if signum is not None:
            run.metrics.close()
            raise StoppedOnSignal(signum, f"step {step}")
    return finish(run, z1, z2)


def set_up(spec: PretrainSpec) -> Run:
    """Join the process group, open the data, build model, optimizer, schedule and loss, resume if a checkpoint exists."""
    place = distributed.setup(spec.runtime)
    storage.configure_s3(storage.S3Settings(**spec.data.s3.model_dump()))  # the outputs' default (checkpoints, metrics)
    torch.manual_seed(spec.runtime.seed)
    if place.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels once
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
    checkpointer = Checkpointer(spec.output.url, every=spec.output.checkpoint_every, keep=spec.output.keep,
                                is_main=place.is_main, run=run_record(spec, place),
                                parts={"model": model, "optimizer": optimizer, "data": position, "rng": RNG(place.device)})
    checkpointer.resume(lambda saved, url: check_same_run(saved, run_record(spec, place), url))
    metrics = Metrics(spec.output.url, place.is_main, total_steps, position.step)
    metrics.print(f"pretrain {spec.name}: {source.num_samples} images, {steps_per_epoch} steps/epoch × {o.epochs} epochs, "
                  f"{place.world_size} process(es) on {place.device.type}{', bf16' if place.autocast_dtype else ''}"
                  f"{resume_note(checkpointer.resumed_run, place, position.step)}")
    autocast = torch.autocast(place.device.type, dtype=place.autocast_dtype) if place.autocast_dtype else nullcontext()
    return Run(spec, place, source, steps_per_epoch, total_steps, model, wrap_for_speed(model, spec.runtime, place),
               optimizer, WarmupCosine(round(o.warmup_epochs * steps_per_epoch), total_steps, o.batch_size),
               BarlowTwinsLoss(o.lambd), autocast, position, checkpointer, metrics)


def build_model(spec: PretrainSpec, place: distributed.Placement) -> nn.Module:
    m = spec.model
    model = BarlowTwins(m.arch, m.projector, m.small_images, m.width, in_channels=spec.data.channels)
    if place.device.type == "cuda" and place.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics of the global batch, as in the paper
    model = model.to(place.device)
    return model.to(memory_format=torch.channels_last) if place.autocast_dtype else model


def wrap_for_speed(model: nn.Module, runtime: RuntimeSpec, place: distributed.Placement) -> nn.Module:
    """DDP without gradient copies (gradients are views of the buckets; every step uses every parameter, so the
    graph is static), then torch.compile where `runtime.compile` asks for it."""
    wrapped = model
    if place.world_size > 1:
        wrapped = DistributedDataParallel(model, gradient_as_bucket_view=True, static_graph=True)
    return torch.compile(wrapped) if compile_enabled(runtime, place.device) else wrapped


def compile_enabled(runtime: RuntimeSpec, device: torch.device) -> bool:
    """runtime.compile: on / off as given; auto is off until bench/gpu.py shows compile wins on CUDA (and the CPU)."""
    return runtime.compile == "on"


def device_batches(spec: PretrainSpec, source: Source, place: distributed.Placement, start_step: int,
                   steps_per_epoch: int) -> Iterator[DeviceBatch]:
    """This rank's batches (both views, labels, corrupt count) on the device, from global step `start_step` to the end
    of training: loader workers read and crop on the host, the rest of the two views runs batched on the device
    (barlow.data.feed)."""
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


def log_step(run: Run, step: int, mean_loss: torch.Tensor, corrupt: torch.Tensor, images_per_s: float) -> None:
    """One metrics line; the only place the loop reads device values."""
    values = torch.stack([mean_loss.float(), run.loss_fn.on_diag, run.loss_fn.off_diag]).tolist()  # sync: log step
    skipped = distributed.all_sum([corrupt], run.place.device)[0]
    epoch = step / run.steps_per_epoch
    run.metrics.log(step, {"epoch": epoch, "loss": values[0], "on_diag": values[1], "off_diag": values[2],
                           "lr": run.optimizer.param_groups[0]["lr"], "corrupt_images": skipped,
                           "images_per_s": images_per_s})


def run_record(spec: PretrainSpec, place: distributed.Placement) -> dict[str, Any]:
    """What an exact resume depends on, stored beside the weights."""
    return {"model": spec.model.model_dump(mode="json"), "batch_size": spec.optim.batch_size,
            "world_size": place.world_size, "per_rank_batch": spec.optim.batch_size // place.world_size,
            "workers": spec.data.workers, "seed": spec.runtime.seed, "spec_hash": spec.spec_hash()}


def check_same_run(saved: dict[str, Any], now: dict[str, Any], url: str) -> None:
    """A checkpoint resumes only the same model at the same global batch (world size and workers may change)."""
    if saved.get("model") != now["model"] or saved.get("batch_size") != now["batch_size"]:
        raise OutputHoldsAnotherRun(f"output.url: {url} holds a run with another model or global batch "
                                    f"(optim.batch_size); use a new output.url")


def resume_note(saved: dict[str, Any] | None, place: distributed.Placement, step: int) -> str:
    if saved is None:
        return ""
    note = f", resuming at step {step}"
    changed = [f"{k} {saved.get(k)} -> {v}" for k, v in (("world_size", place.world_size),) if saved.get(k) != v]
    if changed:
        note += (f" ({', '.join(changed)}: same global batch and schedule; the data order is exact only with "
                 f"the same world size and loader workers)")
    return note


def finish(run: Run, z1: torch.Tensor | None, z2: torch.Tensor | None) -> dict:
    """Export the backbone as a plain torchvision ResNet state_dict and draw the cross-correlation matrix."""
    spec, place, out = run.spec, run.place, run.spec.output.url
    c = cross_correlation(z1.detach(), z2.detach()) if z1 is not None else None
    summary = {"name": spec.name, "steps": run.position.step, "backbone": storage.join(out, "backbone.pt")}
    if place.is_main:
        buf = io.BytesIO()
        torch.save({k: v.cpu() for k, v in run.model.backbone.state_dict().items()}, buf)
        storage.write_bytes(summary["backbone"], buf.getvalue())
        if c is not None:  # sync: once, at the end
            save_heatmap(c, storage.join(out, "cross_correlation.png"))
            summary["on_diag_mean"] = float(c.diagonal().mean())
            summary["off_diag_abs_mean"] = float((c - torch.diag_embed(c.diagonal())).abs().mean())
        storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=2))
    run.metrics.close()
    distributed.barrier()
    return summary
