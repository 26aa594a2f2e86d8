"""The backbone an evaluation measures: its weights at eval.checkpoint or eval.backbone, the encoder they fit (the
pretraining's run record, checked against the spec's model.*), loaded with one-line errors, and a fingerprint that
proves a frozen backbone stayed frozen."""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

import torch
from torch import nn

from barlow import checkpoint, storage
from barlow.errors import BackboneMismatch, NothingToEvaluate
from barlow.spec import EvalRunSpec, EvalSpec, ModelSpec

BACKBONE_FIELDS = ("arch", "small_images", "width")  # what of model.* shapes the backbone (the projector is not evaluated)


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


def fingerprint(module: nn.Module) -> str:
    """A hash of every parameter and buffer, to prove a frozen backbone stayed frozen."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
