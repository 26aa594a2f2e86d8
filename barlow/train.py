"""Barlow Twins pretraining, run in every torchrun process (locally or in a pod): set up, loop `train_step`, finish.

Host syncs are deliberate: a step queues its work on the device and returns; values are read on the host only at
log steps, at checkpoint steps, and where a stop signal is agreed on (each such place is marked `# sync:`).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from barlow import checkpoint, distributed, runsetup, storage, syncbn
from barlow.data import open_source
from barlow.data.feed import DeviceBatch, TrainingFeed
from barlow.data.source import Source
from barlow.errors import OutputHoldsAnotherRun, RunFailed, TooFewImages, WrongPlacement
from barlow.goodput import interval_steps
from barlow.loss import BarlowTwinsLoss, cross_correlation
from barlow.metrics import save_heatmap
from barlow.model import BarlowTwins
from barlow.monitors import Monitor, build_all, monitor_line, progress_keys
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
class Run(runsetup.RunHandle):
    """Everything set-up builds and the loop uses: the run as runsetup opens it (placement, S3 settings,
    checkpointer, metrics), and pretraining's parts."""

    spec: PretrainSpec
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
    monitors: list[Monitor] = field(default_factory=list)  # barlow.spec.MONITORS, those the spec turns on

    def monitor(self, name: str) -> Monitor | None:
        """The monitor of that name, None when it is off."""
        return next((m for m in self.monitors if m.name == name), None)


class Interval:
    """The steps since the last log step and when that log step's work was done; `images_per_s()` is called after
    the log step's sync, so the rate covers exactly the device work of its own interval."""

    def __init__(self, batch_size: int):
        self.batch_size, self.steps, self.start = batch_size, 0, time.perf_counter()
        self.waited = 0.0  # seconds the loop waited for its next batch in this interval
        self.data_wait = 0.0  # the share of the last finished interval spent waiting for batches
        self.step_s = 0.0

    def images_per_s(self) -> float:
        """The interval's rate (and its `data_wait`); starts the next interval."""
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        rate, self.data_wait = self.steps * self.batch_size / elapsed, min(1.0, self.waited / elapsed)
        self.step_s = elapsed / max(self.steps, 1)  # the last finished interval's seconds per step
        self.steps, self.start, self.waited = 0, now, 0.0
        return rate

    def timed(self, batches: Iterator[DeviceBatch]) -> Iterator[DeviceBatch]:
        """`batches`, adding the time spent waiting for each to `waited`."""
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.waited += time.perf_counter() - start
            if batch is None:
                return
            yield batch


def pretrain(spec: PretrainSpec, stop_signal: runsetup.StopSignal = lambda: None) -> dict:
    """Pretrain to the end of the spec's schedule, resuming from the latest complete checkpoint; returns a summary."""
    run = set_up(spec)
    place, log_every, total = run.place, spec.runtime.log_every, run.total_steps
    loss_sum = torch.zeros((), device=place.device)  # per-step values stay on the device between log steps
    corrupt = torch.zeros((), device=place.device, dtype=torch.float64)
    interval = Interval(spec.optim.batch_size)
    z1 = z2 = None
    skipped = 0  # corrupt images, all ranks, as of the latest log step
    for batch in interval.timed(device_batches(spec, run.source, place, run.position.step, run.steps_per_epoch)):
        loss, z1, z2 = train_step(run, batch.x1, batch.x2, batch.labels)
        run.position.step += 1
        step = run.position.step
        interval.steps += 1
        loss_sum += loss.detach()
        corrupt += batch.n_corrupt
        at_log, at_checkpoint = step % log_every == 0 or step == total, run.checkpointer.due(step, total)
        if at_log:
            skipped = log_step(run, step, loss_sum / interval.steps, corrupt, interval)
            loss_sum.zero_()
            if run.checkpointer.every is None:  # output.checkpoint_every: auto, worked out at the first log step
                auto_checkpoint_every(run, interval.step_s)
        else:
            run.metrics.advance(step)
        for monitor in run.monitors:
            if monitor.due(step, run.steps_per_epoch, total):
                values = monitor.measure(run.model)  # sync: a monitor reads its scalars only when due (probe: never; kNN, rank: epoch ends)
                if values:
                    run.metrics.log(step, {"epoch": step / run.steps_per_epoch, **values})
        # A single process reads its flag every step for free; several agree on it only at log/checkpoint steps.
        if place.world_size == 1 or at_log or at_checkpoint:
            runsetup.stop_point(run, stop_signal, step, f"step {step}")
        if at_checkpoint:
            run.checkpointer.save(step)  # uploads in the background
            run.metrics.sync()
    if skipped:
        run.metrics.print(f"{skipped} corrupt images skipped (data.on_corrupt: skip)")
    return finish(run, z1, z2)


def auto_checkpoint_every(run: Run, step_s: float) -> None:
    """Set the checkpoint interval to Young/Daly's, from the ranks' mean step time (a collective: every rank gets the
    same interval), the state's size and cluster.node_mtbf_hours over the nodes."""
    (total,) = distributed.all_sum([step_s], run.place.device)  # sync: once, at the first log step
    mean_step_s = total / run.place.world_size
    c, nodes = run.spec.cluster, run.spec.runtime.nodes
    every = interval_steps(run.checkpointer.state_bytes(), mean_step_s, c.node_mtbf_hours, nodes)
    run.checkpointer.every = every
    run.metrics.print(f"output.checkpoint_every auto: every {every} steps ({mean_step_s:.3g} s a step, a state of "
                      f"{run.checkpointer.state_bytes() / 1e6:.0f} MB, a failure every "
                      f"{c.node_mtbf_hours / nodes:g} h: Young/Daly)")


def set_up(spec: PretrainSpec) -> Run:
    """Start the process (runsetup.start), open the data, build model, optimizer, schedule, loss and monitors, then
    open the run (runsetup.open_run): resumed from the latest complete checkpoint, with its metrics and trackers."""
    proc = runsetup.start(spec)
    place = proc.place
    o = spec.optim
    source = open_training_data(spec, place)
    steps_per_epoch = source.num_samples // o.batch_size
    if steps_per_epoch == 0:
        raise TooFewImages(f"data.train: {source.num_samples} images are fewer than one global batch "
                           f"(optim.batch_size = {o.batch_size})")
    total_steps = steps_per_epoch * o.epochs
    model = build_model(spec, place)
    optimizer = LARS(param_groups(model, o.lr_weights, o.lr_biases), lr=0.0, weight_decay=o.weight_decay, momentum=o.momentum,
                     eta=o.lars_eta)
    position = Position()
    parts = {"model": model, "optimizer": optimizer, "data": position, "rng": RNG(place.device)}
    monitors = build_all(spec, proc, source, model)
    kept = {m.name: m for m in monitors if m.checkpointed}  # optional parts: an older checkpoint resumes without them
    parts.update(kept)
    autocast = proc.autocast()
    record = run_record(spec, place)
    schedule = WarmupCosine(round(o.warmup_epochs * steps_per_epoch), total_steps, o.batch_size)
    every = None if spec.output.checkpoint_every == "auto" else spec.output.checkpoint_every
    opened = runsetup.open_run(spec, proc, parts=parts, record=record, total_steps=total_steps,
                               steps_per_epoch=steps_per_epoch, batch_size=o.batch_size, every=every, title="pretrain",
                               exports={"backbone.pt": backbone_of}, optional=tuple(kept),
                               monitor_keys=progress_keys(monitors),
                               fits=lambda saved, url: schedule_change(spec, saved, checkpoint.step_of(url),
                                                                       steps_per_epoch, schedule))
    checkpointer, metrics = opened.checkpointer, opened.metrics
    replanned = schedule_change(spec, checkpointer.resumed_run, position.step, steps_per_epoch, schedule)
    metrics.print(f"pretrain {spec.name}: {source.describe()}, {steps_per_epoch} steps/epoch × {o.epochs} epochs, "
                  f"{place.world_size} process(es) on {place.device.type}{', bf16' if place.autocast_dtype else ''}"
                  f"{resume_note(record, checkpointer.resumed_run, position.step, replanned)}")
    for part in checkpointer.fresh_parts:  # a checkpoint written before the part existed
        metrics.print(f"resume: the checkpoint has no {part} state (written before it existed): {part} starts fresh")
    if (line := monitor_line(monitors)) is not None:
        metrics.print(line)
    return Run(**opened.shared(), spec=spec, source=source, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               model=model, forward=wrap_for_speed(model, spec.runtime, place), optimizer=optimizer, schedule=schedule,
               loss_fn=BarlowTwinsLoss(o.lambd), autocast=autocast, position=position, monitors=monitors)


def open_training_data(spec: PretrainSpec, place: distributed.Placement) -> Source:
    """data.train, opened by rank 0 first: it lists the data (or reads what it kept) and keeps what it learnt in the
    output folder; the other ranks then read that, so a prefix is listed once, and not again on a restart."""
    cache = storage.join(spec.output.url, "data", "index-train.json")
    source, failure = None, None
    if place.is_main:
        try:
            source = open_source(spec.data, "train", cache=cache, keep=True)
        except Exception as e:  # raised below, once every rank knows
            failure = e
    if place.world_size > 1 and distributed.any_rank(failure is not None, place.device):  # sync: once, at the start
        if failure is None:
            raise RunFailed(f"data.train: rank 0 could not open {spec.data.train}")
    if failure is not None:
        raise failure
    return source if source is not None else open_source(spec.data, "train", cache=cache)


def backbone_of(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint's backbone weights alone, as `finish` exports them: what an eval of the checkpoint reads."""
    return {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}


def build_model(spec: PretrainSpec, place: distributed.Placement) -> nn.Module:
    m = spec.model
    model = BarlowTwins(m.arch, m.projector, m.small_images, m.width, in_channels=spec.data.channels)
    if place.device.type == "cuda" and place.world_size > 1:
        model = syncbn.convert_sync_batchnorm(model)  # BN statistics of the global batch, as in the paper, no host sync
    return model.to(place.device, memory_format=runsetup.LAYOUT)


def wrap_for_speed(model: nn.Module, runtime: RuntimeSpec, place: distributed.Placement) -> nn.Module:
    """DDP (runsetup.wrap_ddp), then torch.compile where `runtime.compile` asks for it."""
    wrapped = runsetup.wrap_ddp(model, place)
    return torch.compile(wrapped) if compile_enabled(runtime, place.device) else wrapped


def compile_enabled(runtime: RuntimeSpec, device: torch.device) -> bool:
    """runtime.compile: on / off as given; auto is off until bench/gpu/gpu.py shows compile wins on CUDA (and the CPU)."""
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


def train_step(run: Run, x1: torch.Tensor, x2: torch.Tensor,
               labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on one batch of view pairs (and the observing monitors' look at view 1's detached features
    and the labels, e.g. the online probe's step); returns the loss and the embeddings, still on the device."""
    run.schedule.apply(run.optimizer, run.position.step)
    observers = [m for m in run.monitors if m.observes]
    with run.autocast:
        z1, z2, *features = run.forward(x1, x2, with_features=True) if observers else run.forward(x1, x2)
    loss = run.loss_fn(z1, z2)  # float32 even under autocast
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    for monitor in observers:
        monitor.observe(features[0], labels)
    return loss, z1.detach(), z2.detach()


def log_step(run: Run, step: int, mean_loss: torch.Tensor, corrupt: torch.Tensor, interval: Interval) -> int:
    """One metrics line; the only place the loop reads device values. Returns the corrupt images skipped so far."""
    values = torch.stack([mean_loss.float(), run.loss_fn.on_diag, run.loss_fn.off_diag]).tolist()  # sync: log step
    counts = [m.counts() for m in run.monitors]  # each monitor's device counts since the last line (the probe's)
    # sync: the ranks' counts, at the log step
    skipped, *totals = distributed.all_sum([corrupt, *(c for mine in counts for c in mine)], run.place.device)
    images_per_s = interval.images_per_s()  # after the syncs: the interval's device work is done
    epoch = step / run.steps_per_epoch
    line = {"epoch": epoch, "loss": values[0], "on_diag": values[1], "off_diag": values[2],
            "lr": run.optimizer.param_groups[0]["lr"], "corrupt_images": skipped, "images_per_s": images_per_s,
            "data_wait": interval.data_wait}
    stall = run.checkpointer.take_stall()  # the checkpoints of the interval: snapshots, and waits for an upload
    if stall:
        line["checkpoint_stall_s"] = stall
    for monitor, mine in zip(run.monitors, counts, strict=True):  # e.g. the probe's top-1 since the last line
        line.update(monitor.at_log(totals[:len(mine)]))
        totals = totals[len(mine):]
    run.metrics.log(step, line)
    return int(skipped)


def run_record(spec: PretrainSpec, place: distributed.Placement) -> runsetup.RunRecord:
    """What a resume is checked against: the same model at the same global batch (else the output holds another
    run); the world size, loader workers and seed may change, and the resume says so (the data order changes)."""
    return runsetup.RunRecord(
        fixed={"model": spec.model.model_dump(mode="json"), "batch_size": spec.optim.batch_size},
        noted={"world_size": place.world_size, "workers": spec.data.workers, "seed": spec.runtime.seed,
               "epochs": spec.optim.epochs},
        fields={"batch_size": "optim.batch_size", "workers": "data.workers", "seed": "runtime.seed",
                "epochs": "optim.epochs"})


def schedule_change(spec: PretrainSpec, saved: dict[str, Any] | None, step: int, steps_per_epoch: int,
                    schedule: WarmupCosine) -> str:
    """What a resume with another optim.epochs does to the lr schedule, in words ("" when the same or not recorded);
    raises OutputHoldsAnotherRun where the checkpoint lies past the end of the new schedule."""
    before = (saved or {}).get("epochs")
    o = spec.optim
    if before is None or before == o.epochs:
        return ""
    if step > schedule.total_steps:
        raise OutputHoldsAnotherRun(f"output.url: {spec.output.url} holds a run at step {step} (optim.epochs {before}), "
                                    f"past the end of optim.epochs {o.epochs} ({schedule.total_steps} steps): set "
                                    f"optim.epochs {before} or more, or use a new output.url")
    old = WarmupCosine(min(schedule.warmup_steps, steps_per_epoch * before), steps_per_epoch * before, o.batch_size)
    return (f"optim.epochs {before} -> {o.epochs}: the warmup + cosine schedule now ends at step {schedule.total_steps}, "
            f"not {old.total_steps}, so the lr at step {step} is {schedule.lr(o.lr_weights, step):.4g}, "
            f"not {old.lr(o.lr_weights, step):.4g}")


def resume_note(record: runsetup.RunRecord, saved: dict[str, Any] | None, step: int, replanned: str = "") -> str:
    """`, resuming at step N` and what changed since the checkpoint: the data order (world size, loader workers,
    seed) and, from `schedule_change`, the lr schedule (optim.epochs)."""
    if saved is None:
        return ""
    note = f", resuming at step {step}"
    changed = [c for c in record.changes(saved) if not c.startswith("epochs ")]
    if changed:
        note += (f" ({', '.join(changed)}: same global batch{'' if replanned else ' and schedule'}; the data order "
                 f"is exact only with the same world size, loader workers and seed)")
    return note + (f" ({replanned})" if replanned else "")


def finish(run: Run, z1: torch.Tensor | None, z2: torch.Tensor | None) -> dict:
    """Export the backbone as a plain torchvision ResNet state_dict and draw the cross-correlation matrix."""
    spec, place, out = run.spec, run.place, run.spec.output.url
    run.checkpointer.wait()  # the last checkpoint's upload
    if stall := run.checkpointer.take_stall():
        run.metrics.log(run.position.step, {"epoch": run.position.step / run.steps_per_epoch, "checkpoint_stall_s": stall})
    c = cross_correlation(z1.detach(), z2.detach()) if z1 is not None else None
    summary = {"name": spec.name, "steps": run.position.step, "backbone": storage.join(out, "backbone.pt")}
    if place.is_main:
        backbone = {k: v.cpu() for k, v in run.model.backbone.state_dict().items()}
        storage.write_with(summary["backbone"], lambda f: torch.save(backbone, f), run.s3)
        if run.metrics.tracker is not None:
            buf = io.BytesIO()
            torch.save(backbone, buf)
            run.metrics.tracker.log_artifact("backbone.pt", buf.getvalue())
        if c is not None:  # sync: once, at the end
            save_heatmap(c, storage.join(out, "cross_correlation.png"), s3=run.s3)
            summary["on_diag_mean"] = float(c.diagonal().mean())
            summary["off_diag_abs_mean"] = float((c - torch.diag_embed(c.diagonal())).abs().mean())
        storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=2), run.s3)
    run.metrics.close()
    distributed.barrier()
    return summary
