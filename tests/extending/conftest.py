"""Adding a plug-in, for real: a toy one of each kind goes into a temporary copy of the package, as its own module
plus at most two registrations (an edit of a file that exists), and then runs from that copy in a fresh process.
The copy is what a contributor would have after the change; the edits made to it are counted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "barlow"
MAX_REGISTRATIONS = 2  # the extension table's promise: the plug-in's module, and at most two edits elsewhere


@dataclass
class PackageCopy:
    root: Path  # holds barlow/
    edited: set[str] = field(default_factory=set)  # existing files changed, relative to root

    def add_module(self, relative: str, text: str) -> Path:
        """A new file of the plug-in (`barlow/data/toy.py`); refused if it exists."""
        path = self.root / relative
        assert not path.exists(), f"{relative} exists: a plug-in adds its own module"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def register(self, relative: str, after: str, line: str) -> None:
        """One registration: `line` inserted after the first line of an existing file that contains `after`."""
        path = self.root / relative
        lines = path.read_text().splitlines(keepends=True)
        at = next(i for i, text in enumerate(lines) if after in text)
        lines.insert(at + 1, line if line.endswith("\n") else line + "\n")
        path.write_text("".join(lines))
        self.edited.add(relative)

    def run(self, code: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`code` run by a fresh Python that imports barlow from this copy; it must succeed."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.root), *filter(None, [os.environ.get("PYTHONPATH")])])}
        done = subprocess.run([sys.executable, "-c", code], cwd=self.root, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, done.stderr[-4000:]
        return done

    def check_cost(self) -> None:
        assert len(self.edited) <= MAX_REGISTRATIONS, f"edited {sorted(self.edited)}: more than {MAX_REGISTRATIONS} registrations"


@pytest.fixture
def package_copy(tmp_path) -> PackageCopy:
    shutil.copytree(PACKAGE, tmp_path / "barlow", ignore=shutil.ignore_patterns("__pycache__"))
    return PackageCopy(tmp_path)
