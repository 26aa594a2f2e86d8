"""Checkpoints in any fsspec folder: save, find the latest complete one, load, keep the last K.

Layout: `<output>/checkpoints/step-00000123/state.pt` plus a `_COMPLETE` marker written last, so a write
cut short (a killed pod, a full disk) is never taken for the latest one.
"""

from __future__ import annotations

import io
import re
from typing import Any

import torch

from barlow import storage

_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def folder(output_url: str) -> str:
    return storage.join(output_url, "checkpoints")


def _steps(output_url: str) -> list[tuple[int, str]]:
    found = [(int(m.group(1)), n) for n in storage.list_names(folder(output_url)) if (m := _STEP_DIR.match(n))]
    return sorted(found)


def save(output_url: str, step: int, state: dict[str, Any], keep: int) -> str:
    """Write a checkpoint, mark it complete, then delete all but the newest `keep` complete ones."""
    url = storage.join(folder(output_url), f"step-{step:08d}")
    storage.remove(url)  # a leftover partial write of the same step
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(storage.join(url, "state.pt"), buf.getvalue())
    storage.commit(url)
    complete = [u for u in (storage.join(folder(output_url), n) for _, n in _steps(output_url)) if storage.is_complete(u)]
    for old in complete[:-keep]:
        storage.remove(old)
    return url


def latest(output_url: str) -> str | None:
    """The newest complete checkpoint folder under an output URL, or None."""
    for _, name in reversed(_steps(output_url)):
        url = storage.join(folder(output_url), name)
        if storage.is_complete(url):
            return url
    return None


def load(url: str) -> dict[str, Any]:
    """Load a checkpoint folder (or its state.pt) safely: tensors and plain containers only."""
    path = url if url.endswith(".pt") else storage.join(url, "state.pt")
    return torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)


def remove_incomplete(output_url: str) -> list[str]:
    """Delete checkpoint folders without a commit marker (left by a crash mid-write); returns them."""
    removed = []
    for _, name in _steps(output_url):
        url = storage.join(folder(output_url), name)
        if not storage.is_complete(url):
            storage.remove(url)
            removed.append(url)
    return removed
