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
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from barlow import storage
from barlow.errors import CheckpointUploadFailed, OutputHoldsAnotherRun
from barlow.storage import S3Settings

# torch is imported only where state is saved or loaded: finding checkpoints (barlow status, the restart budget)
# needs no torch

_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def folder(output_url: str) -> str:
    return storage.join(output_url, "checkpoints")


def _steps(output_url: str, s3: S3Settings | None) -> list[tuple[int, str]]:
    found = [(int(m.group(1)), n) for n in storage.list_names(folder(output_url), s3) if (m := _STEP_DIR.match(n))]
    return sorted(found)


def save(output_url: str, step: int, state: dict[str, Any], keep: int, s3: S3Settings | None = None,
         files: dict[str, dict[str, Any]] | None = None) -> str:
    """Write a checkpoint (state.pt, and `files`: name -> state of extra files), mark it complete, then delete all
    but the newest `keep` complete ones.

    `torch.save` streams into the upload (a local temporary file, or an S3 multipart upload of a few MB a part), one
    tensor at a time: a checkpoint of gigabytes needs no whole copy in host memory.
    """
    url = storage.join(folder(output_url), f"step-{step:08d}")
    storage.remove(url, s3)  # a leftover partial write of the same step
    import torch

    for name, part in {**(files or {}), "state.pt": state}.items():
        storage.write_with(storage.join(url, name), lambda f, part=part: torch.save(part, f), s3)
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


def load(url: str, s3: S3Settings | None = None, name: str = "state.pt") -> dict[str, Any]:
    """Load a checkpoint folder's `name` (or a .pt URL) safely: tensors and plain containers only."""
    import torch

    path = url if url.endswith(".pt") else storage.join(url, name)
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
    part existed) resumes with that part fresh, named in `fresh_parts`.

    A save stalls training only for the snapshot: the main rank copies the state into host buffers (reused from one
    checkpoint to the next; pinned on CUDA, filled by copies queued on the current stream) and a background thread
    uploads it and writes the commit marker after it. At most one upload is in flight: the next save waits for the
    one before, and `wait()` (a stop signal, the end of the run) waits for it on the main rank and then holds every
    rank at a barrier so that none exits while it is under way (bounded by runtime.collective_timeout_s). An upload
    that failed is raised as CheckpointUploadFailed by the next save or wait, never dropped.

    Resume reads the checkpoint once: the main rank loads it and broadcasts it to the others over the process
    group, tensor by tensor (so 32 ranks pull one copy from storage, not 32)."""

    def __init__(self, output_url: str, *, every: int | None, keep: int, is_main: bool, parts: dict[str, Stateful],
                 run: dict[str, Any], s3: S3Settings | None = None,
                 exports: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] | None = None,
                 optional: tuple[str, ...] = ()):
        self.output_url, self.every, self.keep, self.is_main = output_url, every, keep, is_main
        self.parts, self.run, self.s3 = parts, run, s3
        self.exports = exports or {}  # extra files of each checkpoint, made from its state (e.g. the backbone alone)
        self.optional = optional  # parts added after checkpoints were first written: an older one resumes without them
        self.resumed_run: dict[str, Any] | None = None  # the `run` record of the checkpoint resumed from
        self.fresh_parts: list[str] = []  # parts the resumed checkpoint has no state of (written before they existed)
        self._buffers: list[Any] = []  # the host copies of the state's tensors, reused by every snapshot
        self._upload: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._ready: Any = None  # on CUDA: the event after the snapshot's copies, waited for by the upload
        self.stall_s = 0.0  # time training stood still for checkpoints since the last `take_stall()`

    def due(self, step: int, last_step: int) -> bool:
        """Every `every` steps and at the last (`every` None: not worked out yet, output.checkpoint_every auto)."""
        return (self.every is not None and step % self.every == 0) or step == last_step

    def state_bytes(self) -> int:
        """The bytes of the tensors a checkpoint holds."""
        total = [0]

        def add(t: Any) -> Any:
            total[0] += t.numel() * t.element_size()
            return t
        _map_tensors({name: part.state_dict() for name, part in self.parts.items()}, add)
        return total[0]

    def save(self, step: int, *, wait: bool = False) -> None:
        """Snapshot the state at `step` and upload it in the background (with `wait`, also wait for the upload)."""
        start = time.perf_counter()
        if self.is_main:
            self._join()
            state = {name: part.state_dict() for name, part in self.parts.items()}
            snapshot = self._snapshot({**state, "step": step, "run": self.run})
            self._upload = threading.Thread(target=self._write, args=(step, snapshot), name=f"checkpoint-{step}",
                                            daemon=True)
            self._upload.start()
        self.stall_s += time.perf_counter() - start
        if wait:
            self.wait()

    def wait(self) -> None:
        """Wait for the upload in flight (main rank; raises its failure), then hold every rank at a barrier."""
        start = time.perf_counter()
        if self.is_main:
            self._join()
        self.stall_s += time.perf_counter() - start
        _barrier()

    def take_stall(self) -> float:
        """Seconds training stood still for checkpoints since the last call."""
        stall, self.stall_s = self.stall_s, 0.0
        return stall

    def _join(self) -> None:
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise CheckpointUploadFailed(f"checkpoint upload to {folder(self.output_url)} failed after its retries "
                                         f"({type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''})"
                                         ) from failure

    def _snapshot(self, state: Any) -> Any:
        """The state with every tensor copied into this checkpointer's host buffers (safe to reuse: the upload that
        read them last has finished). On CUDA the copies are queued on the current stream, so they read the
        values of this step and no later kernel of that stream can overwrite them first; the upload thread waits
        for an event recorded after them."""
        import torch

        skeleton, tensors = _skeleton(state)
        if len(self._buffers) != len(tensors):
            self._buffers = [None] * len(tensors)
        cuda = False
        for i, t in enumerate(tensors):
            t = t.detach()
            buf = self._buffers[i]
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = self._buffers[i] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            buf.copy_(t, non_blocking=t.is_cuda)
            cuda |= t.is_cuda
        self._ready = None
        if cuda:
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream())
        return _map_slots(skeleton, lambda index, shape, dtype: self._buffers[index])

    def _write(self, step: int, snapshot: dict[str, Any]) -> None:
        try:
            if self._ready is not None:
                self._ready.synchronize()  # sync: the snapshot's device-to-host copies are done (upload thread only)
            files = {name: make(snapshot) for name, make in self.exports.items()}
            save(self.output_url, step, snapshot, self.keep, self.s3, files)
        except BaseException as e:  # raised on the training thread by the next save or wait
            self._failure = e

    def resume(self, check: Callable[[dict[str, Any], str], None] = lambda run, url: None) -> int:
        """Load the latest complete checkpoint into the parts (after `check(saved run, url)` accepts it);
        returns its step, 0 when there is none. Partial writes of a crashed attempt are deleted first. The main
        rank reads it and broadcasts it to the others."""
        if self.is_main:
            remove_incomplete(self.output_url, self.s3)
            url = latest(self.output_url, self.s3)
            state = load(url, self.s3) if url is not None else None
        else:
            url = state = None
        url, state = _broadcast((url, state))
        if url is None:
            return 0
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


def _map_tensors(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """`obj` with each tensor replaced by fn(tensor), through dicts, lists and tuples."""
    import torch

    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


_SLOT = "__barlow_tensor__"  # a tensor's place in a structure sent without its tensors: [index, shape, dtype]


def _skeleton(obj: Any) -> tuple[Any, list[Any]]:
    """(obj with each tensor replaced by a slot of plain values, the tensors in slot order)."""
    tensors: list[Any] = []

    def slot(t: Any) -> dict[str, list[Any]]:
        tensors.append(t)
        return {_SLOT: [len(tensors) - 1, list(t.shape), str(t.dtype).removeprefix("torch.")]}
    return _map_tensors(obj, slot), tensors


def _map_slots(skeleton: Any, fn: Callable[[int, list[int], str], Any]) -> Any:
    """A skeleton with each slot replaced by fn(index, shape, dtype name)."""
    if isinstance(skeleton, dict):
        if _SLOT in skeleton and len(skeleton) == 1:
            return fn(*skeleton[_SLOT])
        return {k: _map_slots(v, fn) for k, v in skeleton.items()}
    if isinstance(skeleton, list | tuple):
        return type(skeleton)(_map_slots(v, fn) for v in skeleton)
    return skeleton


def _broadcast(obj: Any) -> Any:
    """`obj` of the main rank on every rank: its structure (tensors replaced by slots) as one small weights-only
    torch.save, then each tensor by a broadcast of its own (on the process group's device: NCCL sends GPU tensors);
    the others get CPU tensors, as a load gives."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    main = dist.get_rank() == 0
    size = torch.zeros(1, dtype=torch.int64, device=device)
    if main:
        skeleton, tensors = _skeleton(obj)
        buf = io.BytesIO()
        torch.save(skeleton, buf)
        header = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).to(device)
        size.fill_(header.numel())
    dist.broadcast(size, 0)
    if not main:
        header = torch.empty(int(size.item()), dtype=torch.uint8, device=device)  # sync: the size sizes the header
    dist.broadcast(header, 0)
    if main:
        for t in tensors:
            dist.broadcast(t.detach().to(device).contiguous(), 0)
        return obj
    skeleton = torch.load(io.BytesIO(header.cpu().numpy().tobytes()), weights_only=True)
    received: dict[int, Any] = {}

    def receive(index: int, shape: list[int], dtype: str) -> Any:
        t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(t, 0)
        received[index] = t.cpu()
        return received[index]
    # slots are visited in the order the main rank numbered them (dict order is kept by torch.save)
    return _map_slots(skeleton, receive)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
