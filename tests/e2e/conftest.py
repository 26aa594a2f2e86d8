"""Fixtures for end-to-end runs: the demo image set."""

from __future__ import annotations

from pathlib import Path

import pytest

from barlow.data.demo import write_demo


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_demo(str(root), size=16)
    return root
