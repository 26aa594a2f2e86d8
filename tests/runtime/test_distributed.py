"""runtime.precision -> autocast dtype: `auto` takes bf16 only where the device has bf16 arithmetic (not where it is
emulated, as on V100 and T4, where bf16 runs slower than float32); an explicit bf16 runs wherever bf16 computes."""

from __future__ import annotations

import pytest
import torch

from barlow.distributed import _autocast_dtype, choose_autocast_dtype
from barlow.errors import WrongPlacement


@pytest.mark.parametrize("precision, native, computes, want", [
    ("auto", True, True, torch.bfloat16),   # A100 / H100 / H200, or a CPU with AVX-512 BF16 / AMX
    ("auto", False, True, None),            # V100 / T4: bf16 only emulated
    ("auto", False, False, None),
    ("bf16", True, True, torch.bfloat16),
    ("bf16", False, True, torch.bfloat16),  # asked for explicitly: honoured, emulated
    ("fp32", True, True, None),
    ("fp32", False, False, None),
])
def test_precision_decision(precision, native, computes, want):
    assert choose_autocast_dtype(precision, "cuda", native=native, computes=computes) is want


def test_bf16_asked_for_where_it_does_not_compute_names_the_field():
    with pytest.raises(WrongPlacement, match=r"^runtime\.precision: bf16 is not supported on this cuda$"):
        choose_autocast_dtype("bf16", "cuda", native=False, computes=False)


def test_auto_on_this_cpu_follows_onednn():
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert _autocast_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if native else None)
    assert _autocast_dtype("fp32", torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_this_gpu_is_bf16_exactly_where_it_is_native():
    native = torch.cuda.get_device_capability()[0] >= 8
    assert _autocast_dtype("auto", torch.device("cuda", 0)) is (torch.bfloat16 if native else None)
