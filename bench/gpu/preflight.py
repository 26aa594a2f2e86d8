"""GPU check kit, part 0: the stack this machine has (Python, torch, torchvision, CUDA, GPU), and one line per barlow
feature it lacks. Quick (a few seconds, no compilation); never fails the kit: what it finds decides nothing, it is
read with the parts' results.

    python bench/gpu/preflight.py [--out DIR]   # prints, and writes DIR/preflight.md
    python bench/gpu/preflight.py --wheels      # the pinned wheels bench/gpu.sh --fetch-wheels downloads, one a line

Imports only the standard library at the top, so `--wheels` runs where torch is missing.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import io
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What the GPU test machine's image (Python 3.12, torch 2.11, torchvision 0.26) lacks among barlow's dependencies,
# as import names. The kit never imports the cluster and S3 ones (checked by tests/bench/test_gpu_kit.py).
IMAGE_LACKS = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "s3fs", "boto3", "botocore",
               "aiobotocore", "kubernetes", "kubeflow", "torchcodec")
# The wheels the kit carries there: requirement -> import name. barlow.spec needs pydantic; pydantic needs the next
# three; typing-extensions is on the image but maybe below pydantic's floor (>= 4.16), so the tested one travels.
# Pinned to what the project's environment holds (tests/bench/test_gpu_kit.py checks both).
WHEELS = {
    "pydantic==2.14.4": "pydantic",
    "pydantic-core==2.50.5": "pydantic_core",  # compiled: the one wheel that is not pure Python (cp312 manylinux)
    "annotated-types==0.8.0": "annotated_types",
    "typing-inspection==0.4.5": "typing_inspection",
    "typing-extensions==4.16.0": "typing_extensions",
}
# The kit's test runner and its needs (pure Python): an image without them would run no test at all.
RUNNER_WHEELS = {
    "pytest==9.2.0": "pytest",
    "pluggy==1.7.0": "pluggy",
    "iniconfig==2.3.1": "iniconfig",
    "packaging==26.4": "packaging",
    "pygments==2.21.0": "pygments",
}
WHEELS |= RUNNER_WHEELS
# The files the kit runs; every barlow module they import (at any depth of the file) is tried by the preflight.
KIT_FILES = ("bench/gpu/gpu.py", "bench/views.py", "bench/gpu/preflight.py", "bench/gpu/kit_report.py", "tests/gpu",
             "tests/runtime/test_two_ranks_one_device.py", "tests/runtime/test_distributed.py",
             "tests/data/test_handover.py", "tests/support/device_decoders.py", "tests/support/imagesets.py",
             "tests/support/reference_views.py")
FLOOR = {"torch": (2, 11), "torchvision": (0, 26)}


def kit_imports(root: Path = ROOT) -> set[str]:
    """Every absolute module name the kit's files import, wherever in the file (functions import lazily too)."""
    names: set[str] = set()
    for entry in KIT_FILES:
        p = root / entry
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    names |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module)
                    base = root / node.module.replace(".", "/")
                    # `from barlow import train`: a module too
                    names |= {f"{node.module}.{a.name}" for a in node.names
                              if (base / f"{a.name}.py").exists() or (base / a.name / "__init__.py").exists()}
    return names


def kit_barlow_modules() -> list[str]:
    return sorted(n for n in kit_imports() if n == "barlow" or n.startswith("barlow."))


def _version(v: str) -> tuple[int, int]:
    major, minor = v.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def stack() -> list[str]:
    import torch
    import torchvision

    lines = [f"Python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__} (CUDA build {torch.version.cuda}), torchvision {torchvision.__version__}"]
    if torch.cuda.is_available():
        lines.append(f"CUDA runtime {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                     f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, {torch.cuda.device_count()} GPU(s)")
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                         f"{p.multi_processor_count} SMs")
    else:
        lines.append("CUDA: no device visible")
    return lines


def lacks() -> list[str]:
    """One line per barlow feature this stack lacks, with what runs instead."""
    import torch
    import torch.distributed as dist
    import torchvision

    out = []
    for name, mod in (("torch", torch), ("torchvision", torchvision)):
        if _version(mod.__version__) < FLOOR[name]:
            out.append(f"{name} {mod.__version__} is below barlow's floor {'.'.join(map(str, FLOOR[name]))}: "
                       f"expect failures")
    cuda = torch.cuda.is_available()
    if not cuda:
        out.append("no CUDA device: every CUDA test skips and bench/gpu/gpu.py measures nothing")
    try:
        importlib.import_module("torchcodec.decoders")
    except Exception as e:  # ImportError, or OSError / RuntimeError where its libraries do not load
        out.append(f"torchcodec unavailable ({_first_line(e)}): GPU decode goes through torchvision.io")
    if cuda:
        from torchvision.io import decode_jpeg

        try:
            data = torch.frombuffer(bytearray(_tiny_jpeg()), dtype=torch.uint8)
            decode_jpeg([data], device="cuda")
        except Exception as e:
            out.append(f"torchvision.io nvJPEG decode fails ({_first_line(e)}): data.decode gpu falls back per image")
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            out.append("bf16 is emulated on this GPU (compute capability < 8): precision auto runs float32; "
                       "the bf16 rows measure emulation")
        from torch.utils._triton import has_triton

        if not has_triton():
            out.append("Triton missing: torch.compile (inductor) cannot build CUDA kernels; the compile parts fail")
        if torch.cuda.device_count() < 2:
            out.append(f"{torch.cuda.device_count()} GPU: the NCCL DDP test skips; the multi-rank path runs as "
                       f"2 gloo ranks on cuda:0 (tests/runtime/test_two_ranks_one_device.py)")
    if not dist.is_gloo_available():
        out.append("gloo missing: the two-ranks test cannot run")
    import torch.distributed._functional_collectives as funcol

    if not hasattr(funcol, "all_gather_single"):
        out.append("funcol.all_gather_single missing (torch < 2.14): the loss gathers with all_gather_tensor")
    for mod in kit_barlow_modules():
        try:
            importlib.import_module(mod)
        except Exception as e:
            out.append(f"{mod} does not import ({_first_line(e)}): the parts that use it fail; carry the wheels "
                       f"(bench/gpu.sh --fetch-wheels)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for preflight.md")
    ap.add_argument("--wheels", action="store_true", help="print the wheels the kit carries, one requirement a line")
    args = ap.parse_args()
    if args.wheels:
        print("\n".join(WHEELS))
        return 0
    sys.path.insert(0, str(ROOT))
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as e:
        print(f"preflight: {_first_line(e)}: this Python has no torch/torchvision", file=sys.stderr)
        return 2
    found, missing = [], []
    for probe, into in ((stack, found), (lacks, missing)):
        try:
            into += probe()
        except Exception as e:  # a probe that breaks is itself a finding; the kit goes on
            into.append(f"the {probe.__name__} probe failed: {_first_line(e)}")
    text = "\n".join(["## Preflight", "", *(f"- {line}" for line in found), "",
                      "Lacking here:" if missing else "Lacking here: nothing barlow uses.",
                      *(f"- {line}" for line in missing)]) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "preflight.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
