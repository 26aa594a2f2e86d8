"""A check shared by the device-side tests: what would be a hidden host sync on CUDA, recorded on any device."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class HostDataOnDevice(TorchFunctionMode):
    """Records what would be a hidden host sync on CUDA: a tensor built from Python data on a non-CPU device, or a
    blocking copy of a host tensor to one."""

    FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray, torch.arange, torch.linspace, torch.full,
                 torch.scalar_tensor}

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and torch.device(kwargs.get("device") or "cpu").type != "cpu":
            self.found.append(f"{func.__name__} on {kwargs['device']}")
        if func is torch.Tensor.to and args[0].device.type == "cpu":
            device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if device is not None and device.type != "cpu" and not non_blocking:
                self.found.append(f"blocking copy to {device}")
        if func is torch.Tensor.copy_ and args[0].device.type != "cpu" and args[1].device.type == "cpu":
            if not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)):
                self.found.append(f"blocking copy_ to {args[0].device}")
        return func(*args, **kwargs)
