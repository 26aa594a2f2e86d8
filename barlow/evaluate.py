"""Evaluation of a pretrained backbone: linear probe (frozen) or fine-tuning, top-1/top-5, and a kNN monitor.

Shaped like pretraining: `set_up` (the shared scaffolding of barlow.runsetup, then the backbone, the protocol's
classifier and optimizer, and a resume), a loop of `eval_step`, `measure` (validation top-1/top-5 and kNN top-1)
and `finish`. An eval protocol (`eval.mode`) is an `EvalProtocol` class registered in `PROTOCOLS`.

Resumable: the head (and, when fine-tuning, the backbone), the optimizer, the lr schedule and the data position
are checkpointed under `<output>/checkpoints/` at every epoch's end and on a stop signal, and a rerun continues there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from barlow import checkpoint, distributed, progress, runsetup, storage
from barlow.augment import ImageTransform, eval_transform, train_transform
from barlow.checkpoint import Checkpointer
from barlow.data import open_source
from barlow.errors import BackboneMismatch, NothingToEvaluate, SplitsDisagree, StoppedOnSignal, TooFewImages, UnlabelledData
from barlow.knn import features_of, knn_dtype, knn_top1
from barlow.metrics import Metrics
from barlow.model import build_backbone
from barlow.runsetup import to_device
from barlow.spec import EvalRunSpec, EvalSpec, ModelSpec


def backbone_state(source_url: str, is_export: bool, s3: storage.S3Settings | None = None) -> dict[str, torch.Tensor]:
    """The backbone weights at a URL: an exported backbone.pt, a pretrain output folder, or a checkpoint folder."""
    if not is_export:
        if storage.exists(storage.join(source_url, "backbone.pt"), s3):
            source_url = storage.join(source_url, "backbone.pt")
        else:
            found = storage.exists(storage.join(source_url, "state.pt"), s3)
            folder = source_url if found else checkpoint.latest(source_url, s3)
            if folder is None:
                raise NothingToEvaluate(f"eval.checkpoint: no backbone.pt and no complete checkpoint under {source_url}")
            if storage.exists(storage.join(folder, "backbone.pt"), s3):  # a checkpoint's own backbone: read only it
                return checkpoint.load(folder, s3, "backbone.pt")
            model = checkpoint.load(folder, s3)["model"]  # a checkpoint from before they had one
            return {k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")}
    if not storage.exists(source_url, s3):
        raise NothingToEvaluate(f"{'eval.backbone' if is_export else 'eval.checkpoint'}: {source_url} does not exist")
    return torch.load(io.BytesIO(storage.read_bytes(source_url, s3)), map_location="cpu", weights_only=True)


BACKBONE_FIELDS = ("arch", "small_images", "width")  # what of model.* shapes the backbone (the projector is not evaluated)


def recorded_model(e: EvalSpec, s3: storage.S3Settings | None = None) -> dict[str, Any] | None:
    """model.* as the pretraining recorded it in its latest checkpoint's run record: of eval.checkpoint, or of the
    output folder an eval.backbone lies in; None where there is no such checkpoint (or it predates run records)."""
    if e.checkpoint is not None:
        source = e.checkpoint
    else:
        source = e.backbone.rsplit("/", 1)[0] if "/" in e.backbone else "."
    if storage.exists(storage.join(source, "state.pt"), s3):
        folder = source
    else:
        folder = checkpoint.latest(source, s3) if storage.exists(checkpoint.folder(source), s3) else None
    if folder is None:
        return None
    if storage.is_local(folder):  # mapped, not read: only the small record is wanted
        path = os.path.expanduser(storage.join(folder, "state.pt").removeprefix("file://"))
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    else:
        state = checkpoint.load(folder, s3)
    return (state.get("run") or {}).get("model")


def eval_model(spec: EvalRunSpec, s3: storage.S3Settings | None = None) -> ModelSpec:
    """The encoder to evaluate: the spec's model.* where set (checked against the pretraining's record), else the
    record's, else the defaults. Raises BackboneMismatch naming each field that differs."""
    recorded = recorded_model(spec.eval, s3)
    if spec.model is None:
        return ModelSpec.model_validate(recorded) if recorded else ModelSpec()
    if recorded:
        given = spec.model.model_dump()
        differ = [f"model.{k} {given[k]} (the checkpoint's: {recorded.get(k)})" for k in BACKBONE_FIELDS
                  if recorded.get(k) != given[k]]
        if differ:
            raise BackboneMismatch(f"eval: the spec's {', '.join(differ)} does not match the pretraining's run record: "
                                   "leave model out of an eval spec to take the checkpoint's")
    return spec.model


def fingerprint(module: nn.Module) -> str:
    """A hash of every parameter and buffer, to prove a frozen backbone stayed frozen."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    """Correct predictions among the top k, for each k (0-d tensors on the logits' device)."""
    top = logits.topk(max(ks), dim=1).indices
    hits = top.eq(labels[:, None])
    return [hits[:, :k].any(dim=1).sum() for k in ks]


class EvalProtocol(ABC):
    """How the classifier learns on the backbone (one per `eval.mode`): which modules train, with which lr, in which
    mode, and what must hold afterwards."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        self.backbone, self.head = backbone, head

    @property
    @abstractmethod
    def trained(self) -> nn.Module:
        """What the optimizer updates, DDP wraps and checkpoints hold."""

    @abstractmethod
    def param_groups(self, e: EvalSpec) -> list[dict[str, Any]]:
        """The optimizer's parameter groups, with their lr."""

    @abstractmethod
    def train_mode(self) -> None:
        """Put backbone and head in the mode their training needs."""

    @abstractmethod
    def logits(self, forward: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The class scores of a batch; `forward` is `trained`, wrapped for several processes."""

    def check(self) -> None:  # noqa: B027 (optional: most protocols promise nothing to check)
        """After training: raise if the protocol's promise was broken."""


class LinearProbe(EvalProtocol):
    """The backbone frozen (its weights and its BN statistics: eval mode throughout); only the linear head learns,
    on features computed without a graph."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__(backbone, head)
        backbone.requires_grad_(False)
        self.before = fingerprint(backbone)

    @property
    def trained(self) -> nn.Module:
        return self.head

    def param_groups(self, e: EvalSpec) -> list[dict[str, Any]]:
        return [{"params": self.head.parameters(), "lr": e.lr_head}]

    def train_mode(self) -> None:
        self.head.train()
        self.backbone.eval()

    def logits(self, forward: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone(x)
        return forward(features)

    def check(self) -> None:
        if fingerprint(self.backbone) != self.before:
            raise RuntimeError("linear eval changed the frozen backbone (a bug: it must stay untouched)")


class Finetune(EvalProtocol):
    """Backbone and head learn together, the backbone at eval.lr_backbone."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__(backbone, head)
        self._trained = nn.Sequential(backbone, head)

    @property
    def trained(self) -> nn.Module:
        return self._trained

    def param_groups(self, e: EvalSpec) -> list[dict[str, Any]]:
        return [{"params": self.head.parameters(), "lr": e.lr_head},
                {"params": self.backbone.parameters(), "lr": e.lr_backbone}]

    def train_mode(self) -> None:
        self._trained.train()

    def logits(self, forward: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return forward(x)


PROTOCOLS: dict[str, type[EvalProtocol]] = {"linear": LinearProbe, "finetune": Finetune}  # by eval.mode


@dataclass
class EvalRun:
    """Everything set-up builds and the loop and `measure` use."""

    spec: EvalRunSpec
    proc: runsetup.Process
    train_src: Any
    val_src: Any
    num_classes: int
    per_rank: int  # this process's share of eval.batch_size
    backbone: nn.Module
    head: nn.Linear
    protocol: EvalProtocol
    forward: nn.Module  # protocol.trained, wrapped in DDP for several processes
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    autocast: AbstractContextManager
    position: EvalPosition
    checkpointer: Checkpointer
    metrics: Metrics

    @property
    def place(self) -> distributed.Placement:
        return self.proc.place


def evaluate(spec: EvalRunSpec, stop_signal: runsetup.StopSignal = lambda: None) -> dict:
    """Train a linear head (or fine-tune) on the train images, then report val top-1/top-5 and kNN top-1."""
    run = set_up(spec)
    position, log_every = run.position, spec.runtime.log_every
    while position.epoch < spec.eval.epochs:
        run.protocol.train_mode()
        for x, y in train_batches(run):
            eval_step(run, x, y)
            run.metrics.advance(position.batches)
            if position.in_epoch % log_every == 0:
                _stop_if_asked(run, stop_signal)
        end_epoch(run)
        _stop_if_asked(run, stop_signal, saved=True)
    return finish(run, measure(run))


def set_up(spec: EvalRunSpec) -> EvalRun:
    """The shared scaffolding (process group, device, S3 settings, seed, numerics), the data, the backbone, the
    protocol's classifier and optimizer, and a resume from the latest complete checkpoint."""
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
    backbone.to(place.device)
    if proc.channels_last:
        backbone.to(memory_format=torch.channels_last)
    head = nn.Linear(backbone.feature_dim, num_classes).to(place.device)
    head.weight.data.normal_(0, 0.01)
    head.bias.data.zero_()
    protocol = PROTOCOLS[e.mode](backbone, head)
    optimizer = torch.optim.SGD(protocol.param_groups(e), lr=e.lr_head, momentum=0.9, weight_decay=e.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, e.epochs)
    position = EvalPosition(device=place.device)
    record = eval_record(spec, place)
    checkpointer = Checkpointer(spec.output.url, every=1, keep=spec.output.keep, is_main=place.is_main,
                                run=record.as_dict(), s3=proc.s3,
                                parts={"trained": protocol.trained, "optimizer": optimizer, "schedule": schedule,
                                       "data": position})
    checkpointer.resume(record.check)
    # steps are optimizer steps, as in pretraining: metrics lines, checkpoints and `barlow status` count the same
    steps_per_epoch = train_src.count(e.train_percent) // ((e.batch_size // place.world_size) * place.world_size)
    metrics = Metrics(spec.output.url, place.is_main, e.epochs * steps_per_epoch, position.batches,
                      title=f"eval ({e.mode})", s3=proc.s3)
    if place.is_main:
        progress.record_run(spec, e.epochs * steps_per_epoch, steps_per_epoch, e.batch_size, proc.s3)
    metrics.print(f"eval {spec.name}: {e.mode}, {e.train_percent}% of {train_src.num_samples} train images, "
                  f"{val_src.num_samples} val images, {num_classes} classes, {e.epochs} epochs"
                  f"{f', resuming at epoch {position.epoch} step {position.in_epoch}' if checkpointer.resumed_run else ''}")
    return EvalRun(spec, proc, train_src, val_src, num_classes, e.batch_size // place.world_size, backbone, head,
                   protocol, runsetup.wrap_ddp(protocol.trained, place), optimizer, schedule, proc.autocast(), position,
                   checkpointer, metrics)


def load_backbone(backbone: nn.Module, state: dict[str, torch.Tensor], model: ModelSpec) -> None:
    """The weights into the backbone; BackboneMismatch (one line) where they do not fit `model`."""
    own = backbone.state_dict()
    shapes = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if shapes or missing or unexpected:
        example = (f"{shapes[0]} is {list(state[shapes[0]].shape)} in the weights, {list(own[shapes[0]].shape)} for "
                   f"model.*" if shapes else (missing + unexpected)[0])
        raise BackboneMismatch(f"eval: the backbone does not match model.* ({model.arch}, width {model.width}, "
                               f"small_images {model.small_images}): {len(shapes)} of another shape, {len(missing)} "
                               f"missing, {len(unexpected)} unexpected weights, e.g. {example}")
    backbone.load_state_dict(state)


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
    spec, place, position = run.spec, run.place, run.position
    d = spec.data
    batches = run.train_src.loader(transform=ImageTransform(train_transform(d.image_size, d.channels), d.channels),
                                   batch_size=run.per_rank,
                                   rank=place.rank, world_size=place.world_size, seed=spec.runtime.seed,
                                   epoch=position.epoch, start_step=position.in_epoch, workers=d.workers,
                                   subset_percent=spec.eval.train_percent, pin_memory=place.device.type == "cuda")
    for batch in batches:
        yield to_device(run.proc, batch.inputs, batch.labels)


def eval_step(run: EvalRun, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step of the classifier; the loss stays on the device."""
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
    """Validation top-1 and top-k (k = min(5, classes)) of backbone + head, and kNN top-1 of the backbone's features
    against the labelled train subset, in % of the validation images of all ranks."""
    e, d, place = run.spec.eval, run.spec.data, run.place
    run.backbone.eval()
    run.head.eval()
    t_eval = ImageTransform(eval_transform(d.image_size, d.channels), d.channels)
    val_feats, val_labels = features_of(run.backbone, run.val_src, t_eval, run.per_rank, run.proc, d.workers)
    k = min(5, run.num_classes)
    with torch.no_grad():
        hits = topk_correct(run.head(val_feats.to(run.head.weight.dtype)), val_labels, (1, k))
    top1, topk, n_val = distributed.all_sum([*hits, len(val_labels)], place.device)
    train_feats, train_labels = features_of(run.backbone, run.train_src, t_eval, run.per_rank, run.proc, d.workers,
                                            e.train_percent, dtype=knn_dtype(place.device))
    knn = knn_top1(train_feats, train_labels, val_feats, val_labels, e.knn_k, run.num_classes)
    run.protocol.check()
    return {"top1": 100 * top1 / n_val, f"top{k}": 100 * topk / n_val, "knn_top1": knn}


def finish(run: EvalRun, measured: dict[str, float]) -> dict:
    """results.json and the last metrics line; every rank returns the results."""
    spec, e = run.spec, run.spec.eval
    run.checkpointer.wait()  # the last epoch's checkpoint upload
    results = {"name": spec.name, "mode": e.mode, "train_percent": e.train_percent, "epochs": e.epochs,
               "classes": run.num_classes, "val_images": run.val_src.num_samples, **measured, "knn_k": e.knn_k,
               "checkpoint": e.checkpoint or e.backbone}
    if run.place.is_main:
        storage.write_text(storage.join(spec.output.url, "results.json"), json.dumps(results, indent=2), run.proc.s3)
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

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "in_epoch": self.in_epoch, "batches": self.batches, "loss_sum": self.loss_sum.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.in_epoch, self.batches = int(state["epoch"]), int(state["in_epoch"]), int(state["batches"])
        self.loss_sum = state["loss_sum"].to(self.device)


def _stop_if_asked(run: EvalRun, stop_signal: runsetup.StopSignal, saved: bool = False) -> None:
    """Checkpoint (unless just done) and raise when any rank has a stop signal (a collective: every rank calls it
    at the same batch)."""
    signum = runsetup.agreed_stop(stop_signal, run.place)
    if signum is None:
        return
    if not saved:
        run.checkpointer.save(run.position.batches)
        run.metrics.sync()
    run.checkpointer.wait()
    run.metrics.stopped(run.position.batches, signum)
    run.metrics.close()
    raise StoppedOnSignal(signum, f"epoch {run.position.epoch} step {run.position.in_epoch}")
