"""barlow.data.handover: a loader worker's reused batch buffers, given back by an explicit release only."""

from __future__ import annotations

import gc

import pytest
import torch

from barlow.data import handover

_N = 3 * 4096 + 5  # bytes per batch: a few pages, not a multiple of one


class _Filled(torch.utils.data.Dataset):
    """Item r: a buffer from `handover.buffer` filled with r's pattern, and its lease."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, r: int):
        blob, lease = handover.buffer(_N)
        blob.copy_(_pattern(r))
        return blob, lease


def _pattern(r: int) -> torch.Tensor:
    return (torch.arange(_N, dtype=torch.int64) * 7 + r * 13).remainder(256).to(torch.uint8)


def _batches(n: int):
    return torch.utils.data.DataLoader(_Filled(n), batch_size=None, num_workers=1, prefetch_factor=2)


def test_a_worker_reuses_a_buffer_only_after_the_training_process_gives_it_back():
    """Two batches are held, the rest given back as they arrive: the held ones keep their bytes while ten more batches
    are made, their slots are not handed out again, and given-back slots are (a lease past the first SLOTS batches
    shows a release reached the worker)."""
    held, later = [], []
    for r, (blob, lease) in enumerate(_batches(14)):
        assert torch.equal(blob, _pattern(r))
        if r < 2:
            assert lease is not None
            held.append((r, blob, lease))
            continue
        later.append(lease.slot if lease is not None else None)
        if lease is not None:
            lease.release(mapped=blob.untyped_storage())
    assert all(torch.equal(blob, _pattern(r)) for r, blob, _ in held)
    assert not {lease.slot for _, _, lease in held} & set(later)
    assert any(slot is not None for slot in later[handover.SLOTS:])
    handover.forget()


def test_batches_never_given_back_get_fresh_memory_not_a_reused_buffer():
    """Nothing released: the first SLOTS batches have a lease, the rest come in fresh shared memory, and every batch
    keeps its own bytes."""
    got = list(_batches(3 * handover.SLOTS))
    assert [lease is not None for _, lease in got] == [True] * handover.SLOTS + [False] * (2 * handover.SLOTS)
    assert all(torch.equal(blob, _pattern(r)) for r, (blob, _) in enumerate(got))


def test_a_release_after_the_worker_exited_is_quiet():
    loader = iter(_batches(1))
    blob, lease = next(loader)
    del loader
    gc.collect()  # the worker exits with its iterator
    lease.release(mapped=blob.untyped_storage())
    lease.release()  # twice: once only, the second is nothing
    handover.forget()


def test_in_the_training_process_a_buffer_comes_back_after_its_release(monkeypatch):
    """Without loader workers the training process makes the batches: same slots, same rule."""
    monkeypatch.setattr(handover, "_slots", None)
    first, lease = handover.buffer(_N)
    assert lease is not None
    lease.release()
    again, lease2 = handover.buffer(_N - 100)
    assert lease2 is not None and lease2.slot == lease.slot and again.data_ptr() == first.data_ptr()
    others = [handover.buffer(_N) for _ in range(handover.SLOTS - 1)]  # held: every slot is in use now
    assert all(lease is not None for _, lease in others) and lease2.slot not in {lease.slot for _, lease in others}
    fresh, none = handover.buffer(_N)
    assert none is None and fresh.numel() == _N
    bigger, lease3 = (lease2.release(), handover.buffer(4 * _N))[1]  # a slot too small for a batch is remade
    assert lease3.slot == lease2.slot and bigger.numel() == 4 * _N and bigger.data_ptr() != first.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinning_an_encoded_batch_gives_its_buffer_back(monkeypatch):
    from barlow.data.cropfirst import Encoded

    monkeypatch.setattr(handover, "_slots", None)
    blob, lease = handover.buffer(_N)
    blob.copy_(_pattern(1))
    empty = torch.empty(0, 3, 4, 4, dtype=torch.uint8)
    enc = Encoded(blob, [_N], torch.zeros(2, 1, 4, dtype=torch.long), torch.zeros(2, 1, dtype=torch.bool), ["a.jpg"],
                  torch.zeros(0, dtype=torch.long), (empty, empty), lease)
    pinned = enc.pin_memory()
    assert pinned.blob.is_pinned() and torch.equal(pinned.blob, _pattern(1)) and enc.lease is None
    assert handover.buffer(_N)[1].slot == lease.slot  # given back: the same slot comes out again
