"""Checkpoints in any fsspec folder: save, find the latest complete one, load, keep the last K; and the
`Checkpointer` a run uses, which owns the cadence and the resume, while the things with state (model,
optimizer, data position, RNG) hand it their state through `state_dict()` / `load_state_dict()`.

Layout: `<output>/checkpoints/step-00000123/state.pt` plus a `_COMPLETE` marker written last, so a write
cut short (a killed pod, a full disk) is never taken for the latest one.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from typing import Any, Protocol

from barlow import storage
from barlow.errors import OutputHoldsAnotherRun
from barlow.storage import S3Settings

# torch is imported only where state is saved or loaded: finding checkpoints (barlow status, the restart budget)
# needs no torch

_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def folder(output_url: str) -> str:
    return storage.join(output_url, "checkpoints")


def _steps(output_url: str, s3: S3Settings | None) -> list[tuple[int, str]]:
    found = [(int(m.group(1)), n) for n in storage.list_names(folder(output_url), s3) if (m := _STEP_DIR.match(n))]
    return sorted(found)


def save(output_url: str, step: int, state: dict[str, Any], keep: int, s3: S3Settings | None = None) -> str:
    """Write a checkpoint, mark it complete, then delete all but the newest `keep` complete ones.

    `torch.save` streams into the upload (a local temporary file, or an S3 multipart upload of a few MB a part), one
    tensor at a time: a checkpoint of gigabytes needs no whole copy in host memory.
    """
    url = storage.join(folder(output_url), f"step-{step:08d}")
    storage.remove(url, s3)  # a leftover partial write of the same step
    import torch

    storage.write_with(storage.join(url, "state.pt"), lambda f: torch.save(state, f), s3)
    storage.commit(url, s3)
    complete = [u for u in (storage.join(folder(output_url), n) for _, n in _steps(output_url, s3))
                if storage.is_complete(u, s3)]
    for old in complete[:-keep]:
        storage.remove(old, s3)
    return url


def latest(output_url: str, s3: S3Settings | None = None) -> str | None:
    """The newest complete checkpoint folder under an output URL, or None."""
    for _, name in reversed(_steps(output_url, s3)):
        url = storage.join(folder(output_url), name)
        if storage.is_complete(url, s3):
            return url
    return None


def step_of(url: str) -> int:
    """The step a checkpoint folder holds, read from its name."""
    m = _STEP_DIR.match(url.rstrip("/").rsplit("/", 1)[-1])
    if m is None:
        raise ValueError(f"{url}: not a checkpoint folder (step-NNNNNNNN)")
    return int(m.group(1))


def load(url: str, s3: S3Settings | None = None) -> dict[str, Any]:
    """Load a checkpoint folder (or its state.pt) safely: tensors and plain containers only."""
    import torch

    path = url if url.endswith(".pt") else storage.join(url, "state.pt")
    if storage.is_local(path):  # read from the file: no copy of its bytes beside the tensors
        return torch.load(os.path.expanduser(path.removeprefix("file://")), map_location="cpu", weights_only=True)
    return torch.load(io.BytesIO(storage.read_bytes(path, s3)), map_location="cpu", weights_only=True)


def remove_incomplete(output_url: str, s3: S3Settings | None = None) -> list[str]:
    """Delete checkpoint folders without a commit marker (left by a crash mid-write); returns them."""
    removed = []
    for _, name in _steps(output_url, s3):
        url = storage.join(folder(output_url), name)
        if not storage.is_complete(url, s3):
            storage.remove(url, s3)
            removed.append(url)
    return removed


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class Checkpointer:
    """One run's checkpoints: when to write (every `every` steps and at the end), keep the newest `keep`,
    resume from the latest complete one. `parts` are saved under their names; `run` (the run record: what a resume
    is checked against) is stored beside them; a checkpoint without an `optional` part's state (written before the
    part existed) resumes with that part fresh, named in `fresh_parts`. Only the main rank writes; every rank waits
    for the write so none exits while it is under way (the wait is bounded by the process group's timeout, runtime.collective_timeout_s)."""

    def __init__(self, output_url: str, *, every: int, keep: int, is_main: bool, parts: dict[str, Stateful],
                 run: dict[str, Any], s3: S3Settings | None = None, optional: tuple[str, ...] = ()):
        self.output_url, self.every, self.keep, self.is_main = output_url, every, keep, is_main
        self.parts, self.run, self.s3 = parts, run, s3
        self.optional = optional  # parts added after checkpoints were first written: an older one resumes without them
        self.resumed_run: dict[str, Any] | None = None  # the `run` record of the checkpoint resumed from
        self.fresh_parts: list[str] = []  # parts the resumed checkpoint has no state of (written before they existed)

    def due(self, step: int, last_step: int) -> bool:
        return step % self.every == 0 or step == last_step

    def save(self, step: int) -> None:
        if self.is_main:
            state = {name: part.state_dict() for name, part in self.parts.items()}
            save(self.output_url, step, {**state, "step": step, "run": self.run}, self.keep, self.s3)
        _barrier()

    def resume(self, check: Callable[[dict[str, Any], str], None] = lambda run, url: None) -> int:
        """Load the latest complete checkpoint into the parts (after `check(saved run, url)` accepts it);
        returns its step, 0 when there is none. Partial writes of a crashed attempt are deleted first."""
        if self.is_main:
            remove_incomplete(self.output_url, self.s3)
        _barrier()
        url = latest(self.output_url, self.s3)
        if url is None:
            return 0
        state = load(url, self.s3)
        self.resumed_run = state.get("run", {})
        check(self.resumed_run, url)
        for name, part in self.parts.items():
            if name in state:
                part.load_state_dict(state[name])
            elif name in self.optional:  # an older checkpoint layout: this part starts fresh (the run says so)
                self.fresh_parts.append(name)
            else:
                raise OutputHoldsAnotherRun(f"{url}: holds no {name} state (not a checkpoint of this kind of run)")
        return int(state["step"])


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
