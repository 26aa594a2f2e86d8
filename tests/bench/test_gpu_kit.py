"""The GPU check kit, checked on the CPU: it imports on the GPU test machine's image plus exactly the wheels it
carries (simulated here by blocking what that image lacks), the wheel pins are this environment's, and report.md
says what each part left, also when parts failed or never ran."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

import api_audit  # noqa: E402
import kit_report  # noqa: E402
import preflight  # noqa: E402

CARRIED = set(preflight.WHEELS.values())
# The image's Python has these, the project's environment too; a name that is neither barlow nor a test helper.
LOCAL = {"barlow", "device_decoders", "imagesets", "reference_views"}

_IMPORT_BLOCKED = textwrap.dedent("""
    import importlib, importlib.abc, sys
    blocked, modules = set(sys.argv[1].split(",")), sys.argv[2].split(",")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Block())
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as e:
            print(m, type(e).__name__, e)
""")


def _import_with(blocked: set[str], modules: list[str]) -> list[str]:
    """Import `modules` in a fresh interpreter where `blocked` cannot be imported; the lines of those that failed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "support"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _IMPORT_BLOCKED, ",".join(sorted(blocked)), ",".join(modules)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _kit_modules() -> list[str]:
    third_party = {n.split(".")[0] for n in preflight.kit_imports()} - set(sys.stdlib_module_names) - LOCAL
    return sorted(third_party) + preflight.kit_barlow_modules() + ["device_decoders", "imagesets", "reference_views"]


@pytest.mark.slow  # imports torch, torchvision and barlow in fresh interpreters
def test_the_kit_imports_on_the_gpu_image_with_exactly_the_carried_wheels():
    lacks = set(preflight.IMAGE_LACKS)
    assert _import_with(lacks - CARRIED, _kit_modules()) == []  # the image plus the wheels: everything imports
    # each carried wheel of barlow's: without it something fails (the test runner's are for the image's sake)
    for needed in sorted(CARRIED - {"typing_extensions"} - set(preflight.RUNNER_WHEELS.values())):
        failed = _import_with((lacks - CARRIED) | {needed}, ["barlow.spec"])
        assert failed and needed in failed[0], needed


def test_carried_wheels_are_pinned_to_this_environment():
    for requirement in preflight.WHEELS:
        name, version = requirement.split("==")
        assert importlib.metadata.version(name) == version, f"{requirement}: this environment has {importlib.metadata.version(name)}"
    # typing-extensions travels for pydantic's floor, which the pinned one meets
    floor = next(r for r in importlib.metadata.requires("pydantic") if r.startswith("typing-extensions"))
    pinned = next(r for r in preflight.WHEELS if r.startswith("typing-extensions")).split("==")[1]
    low = re.search(r">=\s*([\d.]+)", floor).group(1)
    assert tuple(map(int, pinned.split("."))) >= tuple(map(int, low.split("."))), floor


def test_the_kit_files_exist_and_import_barlow_through_known_modules():
    for entry in preflight.KIT_FILES:
        assert (ROOT / entry).exists(), entry
    assert {"barlow.spec", "barlow.train", "barlow.loss", "barlow.checkpoint"} <= set(preflight.kit_barlow_modules())


def _bench_json(out: Path, name: str, rows: list[dict]) -> None:
    (out / name).write_text(json.dumps({"meta": {"device_name": "NVIDIA H200"}, "rows": rows}))


JUNIT = """<?xml version="1.0"?><testsuites><testsuite name="pytest">
<testcase classname="tests.gpu.test_train_syncs" name="test_train_steps_between_log_steps_do_not_sync"{sync}</testcase>
<testcase classname="tests.gpu.test_feed_cuda" name="test_cpu_decode_views_on_cuda[0]"></testcase>
</testsuite></testsuites>"""


@pytest.mark.parametrize("case, parts, bench, views, sync, want", [
    ("all met", "preflight\t0\t3\t45\ntests\t0\t80\t130\nbench\t0\t100\t150\nviews\t0\t20\t45\n",
     [("synthetic", 1500.0), ("shards", 1400.0)],
     "| NVIDIA H200 | decode + both views | 224 | 256 | 12,000 views/s |\n| NVIDIA H200 | both views only | 224 | 256 | 40,000 views/s |",
     ">", ["| ResNet-50 pairs/s, batch 256, bf16, synthetic | >= 1,200 | 1,500 | met | bench |",
           "| shard-fed / synthetic pairs/s | >= 0.90x | 0.93x | met | bench |",
           "| device views (both views, no decode) | >= 10,000 views/s | 40,000 | met | views |",
           "| GPU decode (with both views: a lower bound) | >= 5,000 images/s | 6,000 | met | views |",
           "| host syncs between log steps | 0 | 0 (sync debug mode raised nothing) | met | tests |",
           "| compile-tests | not reached |  |  |"]),
    ("missed and stopped", "preflight\t0\t3\t45\ntests\t1\t80\t130\nbench\t124\t150\t150\n",
     [("synthetic", 900.0)], "", '><failure message="RuntimeError: called a synchronizing CUDA operation">x</failure>',
     ["| tests | failed (exit 1) | 80 | 130 |", "| bench | stopped at its time limit | 150 | 150 |",
      "| views | not reached |  |  |", "| ResNet-50 pairs/s, batch 256, bf16, synthetic | >= 1,200 | 900 | NOT met | bench |",
      "| shard-fed / synthetic pairs/s | >= 0.90x | —x | not measured | bench |",
      "| host syncs between log steps | 0 | FAILED: RuntimeError: called a synchronizing CUDA operation | NOT met | tests |",
      "- FAILED: `tests.gpu.test_train_syncs::test_train_steps_between_log_steps_do_not_sync` — RuntimeError: called a "
      "synchronizing CUDA operation"]),
    ("killed in the preflight", "", [], "", None,
     ["| preflight | not reached |  |  |", "(not run)", "(no results)"]),
    ("budget spent", "preflight\t0\t3\t45\ncompile-bench\tskipped\t0\t4\n", [], "", None,
     ["| compile-bench | skipped: the kit's time budget was spent | 0 | 4 |"]),
])
def test_report_says_what_each_part_left(tmp_path, case, parts, bench, views, sync, want):
    (tmp_path / "parts.tsv").write_text(parts)
    if bench:
        _bench_json(tmp_path, "gpu-bench.json", [{"mode": m, "config": "reference", "pairs_per_s": v} for m, v in bench])
    (tmp_path / "views.log").write_text(views)
    if sync is not None:
        (tmp_path / "tests.xml").write_text(JUNIT.format(sync=sync))
    if "preflight\t0" in parts:
        (tmp_path / "preflight.md").write_text("## Preflight\n\n- GPU 0: NVIDIA H200\n")
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "kit_report.py"), str(tmp_path), "0", str(time.time())],
                   check=True, timeout=60)
    text = (tmp_path / "report.md").read_text()
    assert not (tmp_path / "report.md.tmp").exists()
    for line in want:
        assert line in text.splitlines(), f"{case}: {line!r} not in\n{text}"


def test_tests_stopped_before_their_summary_are_read_from_the_log(tmp_path):
    (tmp_path / "parts.tsv").write_text("tests\t124\t130\t130\n")
    (tmp_path / "tests.log").write_text(
        "tests/gpu/test_train_syncs.py::test_train_steps_between_log_steps_do_not_sync PASSED [ 40%]\n"
        "tests/gpu/test_feed_cuda.py::test_cpu_decode_views_on_cuda[0] FAILED [ 60%]\n"
        "tests/test_two_ranks_one_device.py::test_two_ranks_on_one_device_take_the_one_process_steps[cuda] \n")
    lines = kit_report.render(tmp_path, dry=False, start=time.time()).splitlines()
    assert "| tests | stopped at its time limit | 130 | 130 |" in lines
    assert "| host syncs between log steps | 0 | 0 (sync debug mode raised nothing) | met | tests |" in lines
    assert "1 FAILED, 1 passed" in lines
    assert ("- FAILED: `tests/gpu/test_feed_cuda.py::test_cpu_decode_views_on_cuda[0]` — from the log: the part was "
            "stopped before its summary") in lines


def test_a_dry_run_report_claims_no_measurement(tmp_path):
    (tmp_path / "parts.tsv").write_text("bench\t0\t10\t150\n")
    _bench_json(tmp_path, "gpu-bench.json", [{"mode": "synthetic", "config": "reference", "pairs_per_s": 5000.0}])
    text = kit_report.render(tmp_path, dry=True, start=time.time())
    assert "DRY RUN on the CPU: nothing here is a GPU measurement" in text
    assert "| ResNet-50 pairs/s, batch 256, bf16, synthetic | >= 1,200 | 5,000 | dry run: not a measurement | bench |" in text


def test_api_audit_finds_a_missing_function_and_a_missing_keyword(tmp_path):
    """bench/api_audit.py against a made-up older torch: one function and one keyword taken out of the real sources."""
    import inspect

    import torch.cuda
    import torch.distributed._functional_collectives as funcol

    old = tmp_path / "old"
    for module, cut in ((torch.cuda, ("including_emulation", "no_such_keyword")),
                        (funcol, ("def all_gather_single(", "def _gone_all_gather_single("))):
        src = Path(inspect.getsourcefile(module))
        rel = src.relative_to(Path(torch.__file__).parents[1])  # the site-packages folder
        (old / rel).parent.mkdir(parents=True, exist_ok=True)
        (old / rel).write_text(src.read_text().replace(*cut))
    (tmp_path / "uses.py").write_text("import torch\nimport torch.distributed._functional_collectives as funcol\n"
                                      "torch.cuda.is_bf16_supported(including_emulation=False)\nfuncol.all_gather_single\n"
                                      "funcol.all_reduce\n")
    found = api_audit.uses(tmp_path / "uses.py")
    problems = {n: api_audit.check(n, found[n], old) for n in found}
    assert problems["torch.cuda.is_bf16_supported"] == ("torch.cuda.is_bf16_supported: keyword(s) including_emulation "
                                                        "missing in torch/cuda/__init__.py")
    assert problems["torch.distributed._functional_collectives.all_gather_single"].endswith(
        "all_gather_single not defined in torch/distributed/_functional_collectives.py")
    assert problems["torch.distributed._functional_collectives.all_reduce"] is None


@pytest.mark.parametrize("busy, want", [
    ([(0, 10), (10, 20), (20, 30)], (0.0, 0.0)),  # back to back
    ([(0, 10), (5, 15), (2000, 2100)], (1.985, 100 * 1985 / 2100)),  # overlapping streams merge; one 1.985 ms gap
    ([(3000, 4000), (0, 1000), (1500, 2000)], (1.0, 100 * 1500 / 4000)),  # out of order
    ([], (None, None)),
])
def test_idle_gaps_between_busy_intervals(busy, want):
    import gpu

    got = gpu.idle_gaps(busy)
    assert got == pytest.approx(want) if want[0] is not None else got == want


def test_the_report_ends_with_the_numbers_to_take(tmp_path):
    (tmp_path / "parts.tsv").write_text("bench\t0\t100\t150\n")
    (tmp_path / "gpu-bench.json").write_text(json.dumps({
        "meta": {"device_name": "NVIDIA H100 80GB HBM3", "sizes": {"arch": "resnet50", "image": 224, "batch": 256}},
        "rows": [{"mode": "synthetic", "config": "reference", "pairs_per_s": 1500.0, "step_ms": 170.7,
                  "gpu_gap_ms_max": 0.05},
                 {"mode": "shards", "config": "reference", "pairs_per_s": 1410.4, "step_ms": 181.5,
                  "gpu_gap_ms_max": 0.4, "gpu_idle_pct": 0.8}]}))
    lines = kit_report.render(tmp_path, dry=False, start=time.time()).splitlines()
    assert "| shard-fed steps: longest GPU idle gap (profiler) | < 2 ms | 0.40 ms (0.8 % idle) | met | bench |" in lines
    table = lines[lines.index("## Numbers to take (README GPU section, barlow/launch/throughput.py)"):]
    assert table[-1].startswith('| throughput.py row | `Measured(gpu="NVIDIA-H100-80GB-HBM3", arch="resnet50", '
                                'image_size=224, precision="bf16", images_per_s_per_gpu=1410.0, source="bench/gpu.sh, ')
    assert "| shard-fed pairs/s (reference) | 1,410 | README GPU section; throughput.py `images_per_s_per_gpu` |" in table
    assert "| longest GPU gap ms, synthetic / shard-fed | 0.05 / 0.40 | README GPU section |" in table


def test_without_the_wheels_the_kit_stops_in_one_line(tmp_path):
    """A Python lacking pydantic (blocked here by a sitecustomize) and no wheels carried: one error line naming what
    to carry, exit 2, before any part runs (no install attempt against a registry the GPU machine cannot reach)."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'pydantic':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n")
    env = {**os.environ, "PYTHONPATH": str(blocker), "BARLOW_WHEELS": str(tmp_path / "none"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(tmp_path / "out")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu.sh: error: ") and "pydantic" in lines[0], done.stderr
    assert ".whl" in lines[0] and "--fetch-wheels" in lines[0]
    assert not (tmp_path / "out" / "parts.tsv").exists()
