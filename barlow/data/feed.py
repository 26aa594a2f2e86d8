"""Host to device: loader batches in, `DeviceBatch`es (both views, the labels, the corrupt count) out on the training
device, the next batch copied meanwhile.

The loader workers produce uint8 crops (decode=cpu) or file bytes + crop boxes (decode=gpu; see
barlow.augment.HostCrops); the feed copies a batch to the training device (pinned memory, non-blocking copies on a
side CUDA stream, one batch ahead of the one training), in gpu mode decodes and crops it there too, on the same
side stream and also one batch ahead (so neither the JPEG engine nor the crop kernels wait for a step to end, nor a
step for them), and applies the batched views (barlow.augment.DeviceViews) with the batch's seed on the training
stream. On the CPU the same code runs without streams.

Stream hand-offs on CUDA: each batch records an event on the side stream after its copy and decode, and the
training stream waits for that batch's event only (never for the batch behind it); tensors made on the side stream
are `record_stream`ed to the training stream, so the allocator does not hand their memory out (to the decoder of a
later batch either) while it reads them. The decoder synchronises the side stream only (barlow.data.devicedecode).

decode=gpu on a CPU process is an error (the spec rejects it with runtime.device: cpu; `resolve_decode` at start
when auto placement found no GPU): it is asked for explicitly, so it never silently turns into cpu.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from barlow.augment import DeviceViews, HostCrops, ViewsConfig, to_device
from barlow.data import handover
from barlow.data.cropfirst import Encoded
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
class _Ready:
    """A batch made ready on the copy stream (CUDA): its uint8 views on the device (copied, or decoded there in gpu
    mode), labels, corrupt count; `ready` is recorded on the copy stream after all of it."""

    views: tuple[torch.Tensor, torch.Tensor]
    labels: torch.Tensor
    n_corrupt: int
    seed: int
    ready: torch.cuda.Event | None
    error: CorruptImage | None = None  # on_corrupt fail: raised when the batch is reached, not when it is decoded

    def tensors(self) -> list[torch.Tensor]:
        return [*self.views, self.labels]


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

    Holds at most one batch ahead of the one being trained (its copy and decode in flight on a side stream on CUDA).
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
            ahead = self._prepare(next(it, None), stream)
            while ahead is not None:
                current = ahead
                if current.ready is not None:
                    training = torch.cuda.current_stream(self.device)
                    training.wait_event(current.ready)  # this batch's copy and decode, not the next one's
                    for t in current.tensors():
                        t.record_stream(training)
                # the next batch's copy (and decode) is issued before this one is trained: it overlaps its step
                ahead = self._prepare(next(it, None), stream)
                yield self._views(current)
        finally:
            handover.forget()  # the loader workers' buffers this epoch mapped (see barlow.data.handover)

    def _prepare(self, batch: HostBatch | None, stream: torch.cuda.Stream | None) -> _Ready | None:
        """A batch's copy to the device and, in gpu mode, its decode, all queued on the copy stream `stream`: the
        decoder synchronises that stream only (devicedecode's nvJPEG rule), never the training stream."""
        if batch is None:
            return None
        error = None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            labels = to_device(batch.labels, self.device)
            n_corrupt = batch.n_corrupt
            if isinstance(batch.inputs, Encoded):  # bytes stay on the host: the device decoder reads them from there
                host_views = tuple(to_device(t, self.device) for t in batch.inputs.host_views)
                views, bad, labels = self._decode(batch.inputs, host_views, labels)
                n_corrupt += len(bad)
                if bad and self.on_corrupt == "fail":
                    error = CorruptImage(f"{batch.inputs.names[bad[0]]}: cannot decode image (device decoder)")
            else:
                views = tuple(to_device(t, self.device) for t in batch.inputs)
            ready = None
            if stream is not None:
                ready = torch.cuda.Event()
                ready.record(stream)
        return _Ready((views[0], views[1]), labels, n_corrupt, batch.seed, ready, error)

    def _views(self, up: _Ready) -> DeviceBatch:
        if up.error is not None:
            raise up.error
        v1, v2 = self.views(*up.views, up.seed)
        return DeviceBatch(v1, v2, up.labels, up.n_corrupt)

    def _decode(self, enc: Encoded, host_views: tuple[torch.Tensor, ...],
                labels: torch.Tensor) -> tuple[list[torch.Tensor], list[int], torch.Tensor]:
        """Each image decoded once on the device, both views cropped from it (the host-decoded ones put in their
        rows); an undecodable image is corrupt (its index returned), and its rows are refilled with a readable
        image's crops and label so the batch stays full."""
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
        if bad and self.on_corrupt != "fail":
            src = to_device(torch.tensor(refill_from(n, bad, enc.names), dtype=torch.long), self.device)
            dst = to_device(torch.tensor(bad, dtype=torch.long), self.device)
            views = [x.index_copy(0, dst, x.index_select(0, src)) for x in views]
            labels = labels.index_copy(0, dst, labels.index_select(0, src))
        return views, bad, labels
