"""Host to device: loader batches in, `(x1, x2, n_corrupt, labels)` device views out, the next batch copied meanwhile.

The loader workers produce uint8 crops (decode=cpu) or file bytes + crop boxes (decode=gpu; see
cropfirst.HostCrops); the feed copies a batch to the training device (pinned memory, non-blocking copies on a
side CUDA stream, one batch ahead of the one training), decodes it there in gpu mode, and applies the batched
views (barlow.augment.DeviceViews) with the batch's seed. On the CPU the same code runs without streams.

decode=gpu on a CPU process is an error (the spec rejects it with runtime.device: cpu; `resolve_decode` at start
when auto placement found no GPU): it is asked for explicitly, so it never silently turns into cpu.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch

from barlow.augment import DeviceViews
from barlow.data.cropfirst import Encoded, HostCrops
from barlow.data.decode import CorruptImage
from barlow.data.source import Batch
from barlow.spec import DataSpec

# view 1, view 2 (float, normalised, channels_last), n_corrupt, labels (int64, on the device)
DeviceBatch = tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]


def resolve_decode(decode: str, device: torch.device) -> str:
    """data.decode for this process: auto is gpu on CUDA, else cpu; gpu without CUDA is a ValueError."""
    if decode == "gpu" and device.type != "cuda":
        raise ValueError(f"data.decode: gpu needs a CUDA device, this process runs on {device.type} (use cpu or auto)")
    return ("gpu" if device.type == "cuda" else "cpu") if decode == "auto" else decode


class TrainingFeed:
    """The two halves of BYOL's views for a spec: `transform` for the loader, `feed(batches)` on the device."""

    def __init__(self, data: DataSpec, device: torch.device):
        a = data.augment
        self.device, self.on_corrupt = device, data.on_corrupt
        self.decode = resolve_decode(data.decode, device)
        self.transform = HostCrops(data.image_size, data.channels, a.min_scale, a.flip_prob, decode=self.decode)
        self.views = DeviceViews(data.image_size, data.channels, a.jitter_prob, a.grayscale_prob,
                                 blur_prob=tuple(a.blur_prob), solarize_prob=tuple(a.solarize_prob)).to(device)
        self.pin_memory = device.type == "cuda"  # loader workers' batches pinned by the DataLoader's pin thread

    def __call__(self, batches: Iterable[Batch]) -> DeviceFeed:
        decode = None
        if self.decode == "gpu":
            from barlow.data.devicedecode import decode_views  # CUDA path only

            decode = decode_views
        return DeviceFeed(batches, self.device, self.views, decode, self.transform.size, self.transform.channels,
                          self.on_corrupt)


class DeviceFeed:
    """Iterates `(x1, x2, n_corrupt, labels)` on `device` from an iterable of `Batch`es; len() is the loader's.

    Holds at most one batch ahead of the one being trained (its copy in flight on a side stream on CUDA).
    """

    def __init__(self, batches: Iterable[Batch], device: torch.device, views: DeviceViews,
                 decode: Callable[..., tuple[torch.Tensor, list[int]]] | None = None, size: int = 0, channels: int = 3,
                 on_corrupt: str = "skip"):
        self.batches, self.device, self.views, self.decode = batches, device, views, decode
        self.size, self.channels, self.on_corrupt = size, channels, on_corrupt
        self.cuda = device.type == "cuda"

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[DeviceBatch]:
        stream = torch.cuda.Stream(self.device) if self.cuda else None
        it = iter(self.batches)
        ahead = self._upload(next(it, None), stream)
        while ahead is not None:
            current = ahead
            ahead = self._upload(next(it, None), stream)  # its copy overlaps the step that trains `current`
            if stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(stream)  # deliberate: the copy of `current` is done
                _record(current[0], torch.cuda.current_stream(self.device))
                _record((current[1],), torch.cuda.current_stream(self.device))
            yield self._views(*current)

    def _upload(self, batch: Batch | None, stream: torch.cuda.Stream | None) -> tuple[Any, torch.Tensor, int, int] | None:
        if batch is None:
            return None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            labels = _to(batch.labels, self.device)
            if isinstance(batch.inputs, Encoded):  # bytes stay on the host: the device decoder reads them from there
                return batch.inputs, labels, batch.n_corrupt, batch.seed
            x = tuple(_to(t, self.device) for t in batch.inputs)
        return x, labels, batch.n_corrupt, batch.seed

    def _views(self, inputs: Any, labels: torch.Tensor, n_corrupt: int, seed: int) -> DeviceBatch:
        if isinstance(inputs, Encoded):
            (x1, x2), bad, labels = self._decode(inputs, labels)
            n_corrupt += bad
        else:
            x1, x2 = inputs
        v1, v2 = self.views(x1, x2, seed)
        return v1, v2, n_corrupt, labels

    def _decode(self, enc: Encoded, labels: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], int, torch.Tensor]:
        """Each image decoded once on the device, both views cropped from it; an undecodable image is corrupt, and
        its rows are refilled with a readable image's crops so the batch stays full."""
        n = len(enc.data)
        (x1, x2), bad = self.decode(enc.data, torch.stack(enc.boxes), torch.stack(enc.flips), self.size,
                                    self.channels, self.device)
        bad = sorted(bad)
        if bad and self.on_corrupt == "fail":
            raise CorruptImage(f"{enc.names[bad[0]]}: cannot decode image (device decoder)")
        if bad:
            good = [i for i in range(n) if i not in set(bad)]
            if not good:
                raise CorruptImage(f"every image of a batch is corrupt ({', '.join(enc.names[i] for i in bad[:3])}, ...)")
            src = torch.tensor([good[k % len(good)] for k in range(len(bad))], device=x1.device)
            dst = torch.tensor(bad, device=x1.device)
            x1, x2 = x1.index_copy(0, dst, x1[src]), x2.index_copy(0, dst, x2[src])
            labels = labels.index_copy(0, dst, labels[src])  # a refilled row takes its image's label
        return (x1, x2), len(bad), labels


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()  # loader without workers: pinned here, so the copy can be asynchronous
    return t.to(device, non_blocking=True)


def _record(tensors: Any, stream: torch.cuda.Stream) -> None:
    """Tell the caching allocator the training stream uses memory allocated on the copy stream."""
    for t in tensors if isinstance(tensors, tuple) else ():
        t.record_stream(stream)

