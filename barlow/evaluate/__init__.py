"""Evaluation of a pretrained backbone by an eval protocol (`eval.mode`: linear probe, fine-tuning, ...), with
top-1/top-5 and a kNN top-1.

Shaped like pretraining: `set_up` (barlow.runsetup's start, then the backbone, the protocol and, when it trains, its
optimizer, then runsetup's open_run: the resume, the metrics and trackers), a loop of `eval_step`, `measure` (the
protocol's validation results and the kNN top-1) and `finish`. The protocols live in barlow.evaluate.protocol (the
contract and the registry) and a module each (`linear`, `finetune`); the backbone's loading in
barlow.evaluate.backbone; the kNN in barlow.knn.

Resumable: what the protocol trains (the head; when fine-tuning, the backbone too), the optimizer, the lr schedule
and the data position are checkpointed under `<output>/checkpoints/` at every epoch's end and on a stop signal, and
a rerun continues there.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from barlow import distributed, runsetup, storage
from barlow.augment import ImageTransform, eval_transform, train_transform
from barlow.data import open_source
from barlow.errors import SplitsDisagree, TooFewImages, UnlabelledData
from barlow.evaluate.backbone import (
    BACKBONE_FIELDS,
    backbone_state,
    eval_model,
    fingerprint,
    load_backbone,
    recorded_model,
)
from barlow.evaluate.protocol import PROTOCOLS, EvalProtocol, HeadProtocol, topk_correct
from barlow.knn import features_of, knn_dtype, knn_top1
from barlow.model import build_backbone
from barlow.spec import EvalRunSpec

__all__ = ["BACKBONE_FIELDS", "PROTOCOLS", "EvalPosition", "EvalProtocol", "EvalRun", "HeadProtocol", "backbone_state",
           "eval_model", "eval_record", "eval_step", "evaluate", "fingerprint", "finish", "load_backbone", "measure",
           "recorded_model", "set_up", "topk_correct"]  # the kNN is barlow.knn's


@dataclass
class EvalRun(runsetup.RunHandle):
    """Everything set-up builds and the loop and `measure` use: the run as runsetup opens it (placement, S3
    settings, checkpointer, metrics), and the evaluation's parts."""

    spec: EvalRunSpec
    train_src: Any
    val_src: Any
    num_classes: int
    per_rank: int  # this process's share of eval.batch_size
    backbone: nn.Module
    protocol: EvalProtocol
    epochs: int  # eval.epochs; 0 where the protocol trains nothing
    forward: nn.Module | None  # protocol.trained, wrapped in DDP for several processes (None: nothing trains)
    optimizer: torch.optim.Optimizer | None
    schedule: torch.optim.lr_scheduler.LRScheduler | None
    autocast: AbstractContextManager
    position: EvalPosition


def evaluate(spec: EvalRunSpec, stop_signal: runsetup.StopSignal = lambda: None) -> dict:
    """Train what the protocol trains (a linear head, or the whole network) on the train images, then report its
    validation results and the kNN top-1."""
    run = set_up(spec)
    position, log_every = run.position, spec.runtime.log_every
    while position.epoch < run.epochs:
        run.protocol.train_mode()
        for x, y in train_batches(run):
            eval_step(run, x, y)
            run.metrics.advance(position.batches)
            if position.in_epoch % log_every == 0:
                runsetup.stop_point(run, stop_signal, position.batches, position.where())
        end_epoch(run)
        runsetup.stop_point(run, stop_signal, position.batches, position.where(), saved=True)
    return finish(run, measure(run))


def set_up(spec: EvalRunSpec) -> EvalRun:
    """Start the process (runsetup.start), open the labelled data, load the backbone, build the protocol (and, when
    it trains, its optimizer and schedule), then open the run (runsetup.open_run): resumed from the latest complete
    checkpoint, with its metrics and trackers."""
    proc = runsetup.start(spec)
    place, e, d = proc.place, spec.eval, spec.data
    train_src, val_src = open_source(d, "train"), open_source(d, "val")
    if not train_src.classes:
        raise UnlabelledData(f"data.train: {d.train} is {train_src.describe()}: an eval needs labelled images "
                             "(class folders; a pretrain spec names them in eval.data)")
    if train_src.classes != val_src.classes:
        raise SplitsDisagree("data.val: its classes differ from data.train's")
    num_classes = len(train_src.classes)

    model = eval_model(spec, proc.s3)
    backbone = build_backbone(model.arch, model.small_images, model.width, d.channels)
    state = backbone_state(e.backbone or e.checkpoint, is_export=e.backbone is not None, s3=proc.s3)
    load_backbone(backbone, state, model)
    proc.module_on_device(backbone)
    protocol = PROTOCOLS[e.mode].build(backbone, num_classes)
    position = EvalPosition(device=place.device)
    parts: dict[str, Any] = {"data": position}
    optimizer, schedule, epochs = None, None, 0
    if protocol.trained is not None:
        optimizer = torch.optim.SGD(protocol.param_groups(e), lr=e.lr_head, momentum=0.9, weight_decay=e.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, e.epochs)
        parts = {"trained": protocol.trained, "optimizer": optimizer, "schedule": schedule, **parts}
        epochs = e.epochs
    # steps are optimizer steps, as in pretraining: metrics lines, checkpoints and `barlow status` count the same
    steps_per_epoch = train_src.count(e.train_percent) // ((e.batch_size // place.world_size) * place.world_size)
    opened = runsetup.open_run(spec, proc, parts=parts, record=eval_record(spec, place),
                               total_steps=epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch,
                               batch_size=e.batch_size, every=1, title=f"eval ({e.mode})")
    resumed = opened.checkpointer.resumed_run
    opened.metrics.print(f"eval {spec.name}: {e.mode}, {e.train_percent}% of {train_src.num_samples} train images, "
                         f"{val_src.num_samples} val images, {num_classes} classes, "
                         f"{f'{epochs} epochs' if protocol.trained is not None else 'nothing to train'}"
                         f"{f', resuming at epoch {position.epoch} step {position.in_epoch}' if resumed else ''}")
    forward = runsetup.wrap_ddp(protocol.trained, place) if protocol.trained is not None else None
    return EvalRun(**opened.shared(), spec=spec, train_src=train_src, val_src=val_src, num_classes=num_classes,
                   per_rank=e.batch_size // place.world_size, backbone=backbone, protocol=protocol, epochs=epochs,
                   forward=forward, optimizer=optimizer, schedule=schedule, autocast=proc.autocast(), position=position)


def eval_record(spec: EvalRunSpec, place: distributed.Placement) -> runsetup.RunRecord:
    """A resume continues only the same evaluation; the world size and seed may change (the data order changes)."""
    e = spec.eval
    return runsetup.RunRecord(
        fixed={"mode": e.mode, "train_percent": e.train_percent, "epochs": e.epochs, "batch_size": e.batch_size,
               "source": e.checkpoint or e.backbone},
        noted={"world_size": place.world_size, "seed": spec.runtime.seed}, what="an evaluation",
        fields={"mode": "eval.mode", "train_percent": "eval.train_percent", "epochs": "eval.epochs",
                "batch_size": "eval.batch_size", "source": "eval.backbone" if e.backbone else "eval.checkpoint"})


def train_batches(run: EvalRun):
    """This rank's labelled batches of the current epoch, from the data position on, on the device."""
    spec, place, position, ctx = run.spec, run.place, run.position, run.ctx
    d = spec.data
    batches = run.train_src.loader(transform=ImageTransform(train_transform(d.image_size, d.channels), d.channels),
                                   batch_size=run.per_rank,
                                   rank=place.rank, world_size=place.world_size, seed=spec.runtime.seed,
                                   epoch=position.epoch, start_step=position.in_epoch, workers=d.workers,
                                   subset_percent=spec.eval.train_percent, pin_memory=place.device.type == "cuda")
    for batch in batches:
        yield ctx.batch_on_device(batch.inputs, batch.labels)


def eval_step(run: EvalRun, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step of what the protocol trains; the loss stays on the device."""
    with run.autocast:
        logits = run.protocol.logits(run.forward, x)
    loss = F.cross_entropy(logits.float(), y)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    position = run.position
    position.loss_sum += loss.detach()  # stays on the device until the epoch's line
    position.in_epoch, position.batches = position.in_epoch + 1, position.batches + 1
    return loss.detach()


def end_epoch(run: EvalRun) -> None:
    """The epoch's line, the lr schedule's step and a checkpoint."""
    position, e = run.position, run.spec.eval
    if position.in_epoch == 0:
        raise TooFewImages(f"data.train: the {e.train_percent}% subset is smaller than one batch "
                           f"(eval.batch_size = {e.batch_size})")
    run.schedule.step()
    mean_loss = float(position.loss_sum) / position.in_epoch  # sync: once an epoch
    position.next_epoch()
    run.metrics.log(position.batches, {"epoch": position.epoch, "loss": mean_loss, "lr": run.optimizer.param_groups[0]["lr"]})
    run.checkpointer.save(position.batches)
    run.metrics.sync()


def measure(run: EvalRun) -> dict[str, float]:
    """The protocol's validation results (a trained head's top-1 and top-k) and the kNN top-1 of the backbone's
    features against the labelled train subset, in % of the validation images of all ranks."""
    e, d = run.spec.eval, run.spec.data
    run.protocol.eval_mode()
    t_eval = ImageTransform(eval_transform(d.image_size, d.channels), d.channels)
    val = features_of(run.backbone, run.val_src, t_eval, run.per_rank, run.ctx, d.workers)
    train = features_of(run.backbone, run.train_src, t_eval, run.per_rank, run.ctx, d.workers, e.train_percent,
                        dtype=knn_dtype(run.place.device))
    measured = run.protocol.measure(val, train, run.num_classes)
    knn = knn_top1(*train, *val, e.knn_k, run.num_classes)
    run.protocol.check()
    return {**measured, "knn_top1": knn}


def finish(run: EvalRun, measured: dict[str, float]) -> dict:
    """results.json and the last metrics line; every rank returns the results."""
    spec, e = run.spec, run.spec.eval
    run.checkpointer.wait()  # the last epoch's checkpoint upload
    results = {"name": spec.name, "mode": e.mode, "train_percent": e.train_percent, "epochs": e.epochs,
               "classes": run.num_classes, "val_images": run.val_src.num_samples, **measured, "knn_k": e.knn_k,
               "checkpoint": e.checkpoint or e.backbone}
    if run.place.is_main:
        storage.write_text(storage.join(spec.output.url, "results.json"), json.dumps(results, indent=2), run.s3)
    run.metrics.log(run.position.batches, measured)
    run.metrics.close()
    distributed.barrier()
    return results


@dataclass
class EvalPosition:
    """Where the classifier's training is: epochs done, batches done in the current one and in all, the epoch's loss."""

    device: torch.device
    epoch: int = 0
    in_epoch: int = 0
    batches: int = 0  # numbers the checkpoints, so the newest is always the furthest
    loss_sum: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)

    def next_epoch(self) -> None:
        self.epoch, self.in_epoch = self.epoch + 1, 0
        self.loss_sum.zero_()

    def where(self) -> str:
        """`epoch E step S`, as a stop names it."""
        return f"epoch {self.epoch} step {self.in_epoch}"

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "in_epoch": self.in_epoch, "batches": self.batches, "loss_sum": self.loss_sum.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.in_epoch, self.batches = int(state["epoch"]), int(state["in_epoch"]), int(state["batches"])
        self.loss_sum = state["loss_sum"].to(self.device)
