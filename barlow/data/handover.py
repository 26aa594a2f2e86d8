"""A batch's bytes handed from a loader worker to the training process in shared memory the worker reuses, returned
to it explicitly.

torch's DataLoader hands every batch over in fresh shared memory: the worker faults each new page in and the training
process maps and unmaps it. For the GPU data path's bytes (about 12 MiB per 256 ImageNet-sized JPEGs) that costs more
than the rest of the host part together (bench/views.py --host-part). So each loader worker keeps `SLOTS` buffers
mapped for its life. `buffer(nbytes)` puts a batch's bytes in a free one and gives the batch a `Lease`; the training
process calls `Lease.release()` once nothing will read those bytes again (cropfirst.Encoded.pin_memory after its copy,
the feed after the device decode), which writes the slot's number into the worker's pipe.

A slot is reused only after its release arrived, never on a guess: a lease that is dropped unreleased keeps its slot
out of use, and a worker without a free slot hands the batch over in fresh shared memory, as torch does. (On CUDA the
feed pins every batch, so even the batches a DataLoader drops when an epoch is cut short pass the pinning thread and
give their slot back.) The pipe orders the two processes: the trainer's last read of the bytes comes before its
write, the worker's next write after its read of the slot number.
"""

from __future__ import annotations

import math
import os
from multiprocessing.reduction import DupFd

import torch
from torch.utils.data import get_worker_info

SLOTS = 4  # per worker: the DataLoader's two batches in flight, the one at the pinning thread, the one being made
_GROWTH = 1.25  # a slot made (or remade) for a batch has room for a batch this much bigger


class Lease:
    """One slot of a loader worker's buffers, held by a batch until `release()`; pickled with the batch, it carries a
    duplicate of the worker's pipe to the training process."""

    def __init__(self, fd: int, slot: int, owned: bool = False):
        self._fd, self.slot, self._owned = fd, slot, owned  # owned: this process's own duplicate, closed here

    def __reduce__(self):
        return _lease, (DupFd(self._fd), self.slot)

    def release(self, mapped: torch.UntypedStorage | None = None) -> None:
        """Give the slot back: the caller and everything it handed the bytes to are done with them. Once only.
        `mapped`: this process's map of the slot, kept until `forget()` so the slot's next batch arrives without
        mapping and faulting its pages in again (torch finds a storage still alive by its file)."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            if mapped is not None and self._owned:
                _kept[(os.fstat(fd).st_ino, self.slot)] = mapped  # the pipe names the worker
            os.write(fd, bytes((self.slot,)))
        except OSError:  # the worker has exited: there is no one to give it back to
            pass
        finally:
            if self._owned:
                os.close(fd)

    def __del__(self, _close=os.close) -> None:  # os.close bound early: a lease may outlive `os` at exit
        if self._owned and self._fd >= 0:  # dropped unreleased: the slot stays out of use (see the module doc)
            _close(self._fd)
            self._fd = -1


_kept: dict[tuple[int, int], torch.UntypedStorage] = {}  # (worker's pipe, slot) -> this process's map of the slot


def forget() -> None:
    """Drop the training process's maps of released slots (at the end of an epoch: the memory of workers that have
    exited goes with them)."""
    _kept.clear()


def _lease(fd: DupFd, slot: int) -> Lease:
    return Lease(fd.detach(), slot, owned=True)


class _Slots:
    """One loader worker's reused buffers and the read end of the pipe their releases arrive on."""

    def __init__(self):
        self.pid = os.getpid()
        self.returned, self.give_back = os.pipe()
        os.set_blocking(self.returned, False)
        self.storages: list[torch.UntypedStorage | None] = [None] * SLOTS
        self.free = set(range(SLOTS))

    def take(self, nbytes: int) -> tuple[torch.Tensor, Lease] | None:
        try:
            while got := os.read(self.returned, 4096):
                self.free.update(got)
        except BlockingIOError:  # nothing more has been returned
            pass
        if not self.free:
            return None
        fits = [s for s in self.free if (st := self.storages[s]) is not None and st.nbytes() >= nbytes]
        slot = min(fits) if fits else min(self.free)
        self.free.discard(slot)
        storage = self.storages[slot]
        if storage is None or storage.nbytes() < nbytes:  # the memory of a replaced slot goes when its last map does
            storage = self.storages[slot] = torch.UntypedStorage._new_shared(int(nbytes * _GROWTH))
        return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,)), Lease(self.give_back, slot)


_slots: _Slots | None = None


def buffer(nbytes: int) -> tuple[torch.Tensor, Lease | None]:
    """An uninitialised uint8 tensor of `nbytes` for a batch, and its lease: a reused slot of this process's buffers
    (a loader worker's, or the training process's own where it loads without workers), or where none is free,
    fresh memory (shared in a loader worker) and no lease."""
    global _slots
    if _slots is None or _slots.pid != os.getpid():  # one set per process, never one inherited by a fork
        _slots = _Slots()
    taken = _slots.take(nbytes)
    return taken if taken is not None else (shared_tensor((nbytes,)), None)


def shared_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialised batch tensor; in a loader worker, in fresh shared memory (as torch's default_collate makes
    them), so sending it copies nothing: a plain tensor is copied into shared memory when it is sent."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)  # torch's collate's own call
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
