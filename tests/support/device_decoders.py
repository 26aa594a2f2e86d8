"""The device decoders to test: each that loads here, the others skipped with the reason."""

from __future__ import annotations

import pytest

from barlow.data.devicedecode import decoders


def _loads(name: str) -> bool:
    try:
        decoders(name)
        return True
    except (ImportError, OSError, RuntimeError):
        return False


DECODERS = [pytest.param(name, marks=pytest.mark.skipif(not _loads(name), reason=f"{name} does not load here"))
            for name in ("torchcodec", "torchvision")]
