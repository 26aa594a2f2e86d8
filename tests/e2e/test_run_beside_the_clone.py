"""`barlow run` from a folder that holds other `barlow` and `data` packages (the folder of the clone, the demo data
beside the spec): the processes barlow starts import barlow from where it is installed, not from the working
directory that `python -m` would put first on the path."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from runner import tiny_spec

pytestmark = pytest.mark.slow


def test_run_from_a_folder_with_a_barlow_and_a_data_package(demo_data, tmp_path):
    for package in ("barlow", "data"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(f"raise ImportError('the working directory\\'s {package} was imported')\n")
    shutil.copytree(demo_data, tmp_path / "data" / "demo")
    spec = tiny_spec(Path("data/demo"), Path("runs/tiny"), **{"optim.epochs": 2, "runtime.nproc_per_node": 1})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    installed_cli = Path(sys.executable).parent / "barlow"  # the console script, as a user runs it
    result = subprocess.run([str(installed_cli), "run", "pretrain", "spec.yaml"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "was imported" not in result.stderr
    assert (tmp_path / "runs" / "tiny" / "backbone.pt").is_file()
