"""Host to device: loader batches in, `DeviceBatch`es (both views, the labels, the corrupt count) out on the training
device, the next batch copied meanwhile.

The loader workers produce uint8 crops (decode=cpu) or file bytes + crop boxes (decode=gpu; see
cropfirst.HostCrops); the feed copies a batch to the training device (pinned memory, non-blocking copies on a
side CUDA stream, one batch ahead of the one training), decodes it there in gpu mode, and applies the batched
views (barlow.augment.DeviceViews) with the batch's seed. On the CPU the same code runs without streams.

Stream hand-offs on CUDA: each upload records an event on the side stream and the training stream waits for that
batch's event only (never for the copy of the batch behind it); tensors made on the side stream are
`record_stream`ed to the training stream, so the allocator does not hand their memory out while it reads them.

decode=gpu on a CPU process is an error (the spec rejects it with runtime.device: cpu; `resolve_decode` at start
when auto placement found no GPU): it is asked for explicitly, so it never silently turns into cpu.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from barlow.augment import DeviceViews, ViewsConfig, to_device
from barlow.data import handover
from barlow.data.cropfirst import Encoded, HostCrops
from barlow.data.decode import CorruptImage
from barlow.data.source import HostBatch, refill_from
from barlow.spec import DataSpec


@dataclass
class DeviceBatch:
    """One training batch on the device: both views (float, normalised, channels-last), the labels, and how many
    corrupt images of it were replaced (a host int, or a device tensor)."""

    x1: torch.Tensor
    x2: torch.Tensor
    labels: torch.Tensor
    n_corrupt: int | torch.Tensor


@dataclass
class _Uploaded:
    """A batch whose copy to the device is queued: `ready` is recorded on the copy stream after it (CUDA)."""

    inputs: Any  # (x1, x2) uint8 on the device, or an Encoded (bytes stay on the host)
    host_views: tuple[torch.Tensor, ...]  # Encoded: the host-decoded crops on the device
    labels: torch.Tensor
    n_corrupt: int
    seed: int
    ready: torch.cuda.Event | None

    def tensors(self) -> list[torch.Tensor]:
        ins = list(self.inputs) if isinstance(self.inputs, tuple) else []
        return [*ins, *self.host_views, self.labels]


def resolve_decode(decode: str, device: torch.device) -> str:
    """data.decode for this process: auto is gpu on CUDA, else cpu; gpu without CUDA is a ValueError."""
    if decode == "gpu" and device.type != "cuda":
        raise ValueError(f"data.decode: gpu needs a CUDA device, this process runs on {device.type} (use cpu or auto)")
    return ("gpu" if device.type == "cuda" else "cpu") if decode == "auto" else decode


class TrainingFeed:
    """The two halves of a spec's views (`ViewsConfig`): `transform` for the loader, `feed(batches)` on the device."""

    def __init__(self, data: DataSpec, device: torch.device):
        self.device, self.on_corrupt = device, data.on_corrupt
        self.decode = resolve_decode(data.decode, device)
        self.config = ViewsConfig.from_augment(data.augment, data.image_size, data.channels)
        self.transform = HostCrops(self.config, decode=self.decode)
        self.views = DeviceViews(self.config).to(device)
        self.pin_memory = device.type == "cuda"  # loader workers' batches pinned by the DataLoader's pin thread

    def __call__(self, batches: Iterable[HostBatch]) -> DeviceFeed:
        decode = None
        if self.decode == "gpu":
            from barlow.data.devicedecode import decode_views  # CUDA path only

            decode = decode_views
        return DeviceFeed(batches, self.device, self.views, decode, self.on_corrupt)


class DeviceFeed:
    """Iterates `DeviceBatch`es on `device` from an iterable of `HostBatch`es; len() is the loader's.

    Holds at most one batch ahead of the one being trained (its copy in flight on a side stream on CUDA).
    """

    def __init__(self, batches: Iterable[HostBatch], device: torch.device, views: DeviceViews,
                 decode: Callable[..., tuple[list[torch.Tensor], list[int]]] | None = None, on_corrupt: str = "skip"):
        self.batches, self.device, self.views, self.decode = batches, device, views, decode
        self.on_corrupt = on_corrupt
        self.cuda = device.type == "cuda"

    def __len__(self) -> int:
        assert isinstance(self.batches, Sized)
        return len(self.batches)

    def __iter__(self) -> Iterator[DeviceBatch]:
        stream = torch.cuda.Stream(self.device) if self.cuda else None
        it = iter(self.batches)
        try:
            ahead = self._upload(next(it, None), stream)
            while ahead is not None:
                current = ahead
                if current.ready is not None:
                    training = torch.cuda.current_stream(self.device)
                    training.wait_event(current.ready)  # this batch's copy, not the next one's
                    for t in current.tensors():
                        t.record_stream(training)
                ahead = self._upload(next(it, None), stream)  # its copy overlaps the step that trains `current`
                yield self._views(current)
        finally:
            handover.forget()  # the loader workers' buffers this epoch mapped (see barlow.data.handover)

    def _upload(self, batch: HostBatch | None, stream: torch.cuda.Stream | None) -> _Uploaded | None:
        if batch is None:
            return None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if isinstance(batch.inputs, Encoded):  # bytes stay on the host: the device decoder reads them from there
                inputs, host_views = batch.inputs, tuple(to_device(t, self.device) for t in batch.inputs.host_views)
            else:
                inputs, host_views = tuple(to_device(t, self.device) for t in batch.inputs), ()
            labels = to_device(batch.labels, self.device)
            ready = None
            if stream is not None:
                ready = torch.cuda.Event()
                ready.record(stream)
        return _Uploaded(inputs, host_views, labels, batch.n_corrupt, batch.seed, ready)

    def _views(self, up: _Uploaded) -> DeviceBatch:
        n_corrupt = up.n_corrupt
        if isinstance(up.inputs, Encoded):
            (x1, x2), bad, labels = self._decode(up.inputs, up.host_views, up.labels)
            n_corrupt += bad
        else:
            (x1, x2), labels = up.inputs, up.labels
        v1, v2 = self.views(x1, x2, up.seed)
        return DeviceBatch(v1, v2, labels, n_corrupt)

    def _decode(self, enc: Encoded, host_views: tuple[torch.Tensor, ...],
                labels: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], int, torch.Tensor]:
        """Each image decoded once on the device, both views cropped from it (the host-decoded ones put in their
        rows); an undecodable image is corrupt, and its rows are refilled with a readable image's crops and label
        so the batch stays full."""
        assert self.decode is not None
        n, size = len(enc.names), self.views.config.size
        boxes, flips = enc.boxes, enc.flips
        host = set(enc.host_index.tolist())
        data, channels = enc.data, self.views.config.channels
        if not host:  # the host read every header: the GPU takes them all
            views, bad = self.decode(data, boxes, flips, size, channels, self.device, gpu_ok=[True] * n)
        else:  # the loader workers decoded what the GPU cannot take: the device decodes the rest
            dev = [i for i in range(n) if i not in host]
            decoded, bad_dev = self.decode([data[i] for i in dev], boxes[:, dev], flips[:, dev], size, channels,
                                           self.device, gpu_ok=[True] * len(dev))
            dev_rows, host_rows = to_device(torch.tensor(dev, dtype=torch.long), self.device), to_device(enc.host_index, self.device)
            views = [torch.empty((n, *d.shape[1:]), dtype=d.dtype, device=self.device).index_copy_(0, dev_rows, d)
                     .index_copy_(0, host_rows, h) for d, h in zip(decoded, host_views, strict=True)]
            bad = [dev[i] for i in bad_dev]
        enc.release()  # the decoder has read the bytes (a no-op where pinning gave the worker's buffer back already)
        bad = sorted(bad)
        if bad and self.on_corrupt == "fail":
            raise CorruptImage(f"{enc.names[bad[0]]}: cannot decode image (device decoder)")
        if bad:
            src = to_device(torch.tensor(refill_from(n, bad, enc.names), dtype=torch.long), self.device)
            dst = to_device(torch.tensor(bad, dtype=torch.long), self.device)
            views = [x.index_copy(0, dst, x.index_select(0, src)) for x in views]
            labels = labels.index_copy(0, dst, labels.index_select(0, src))
        return (views[0], views[1]), len(bad), labels
