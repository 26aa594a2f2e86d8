"""Which torch / torchvision APIs barlow calls that an older release lacks (the GPU test machine has torch 2.11 and
torchvision 0.26; the installed ones may be newer).

    python bench/gpu/api_audit.py OLD_SITE [FILES...]

OLD_SITE: a folder holding the older releases' Python sources, e.g. the wheels unpacked with
`unzip -q torch-2.11.0-*.whl '*.py' '*.pyi' -d OLD_SITE` (any platform's wheel: the Python files are the same; the
aarch64 wheel is the smallest). FILES: default barlow/ and the kit's files (bench/gpu/preflight.py's KIT_FILES).

Every dotted name reached from an imported torch / torchvision module (calls, attributes, `from X import Y`) is
resolved with the installed release; where it is a Python function or class, its definition is looked for in the
same file of OLD_SITE, and each keyword the call passes in its signature there; where it is compiled (torch._C), in
OLD_SITE's type stubs. Prints one line per name OLD_SITE lacks (or lacks the keyword of) and exits 1 if any.
A name under a `getattr(..., default)` or `hasattr` guard is still listed: the reader checks the guard. Tensor
methods (`x.to(...)`, `x.record_stream(...)`) are not followed: the static walk cannot tell a tensor from another
object.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))
from preflight import KIT_FILES  # noqa: E402

DEFAULT = ["barlow", *KIT_FILES]
TOP = ("torch", "torchvision")
# Compiled classes, enum members and registered operators the static lookup cannot place, each read by hand in
# torch 2.11.0 / torchvision 0.26.0 (where it is defined there).
BY_HAND = {
    "torch.Tensor": "torch/_tensor.py: class Tensor(torch._C.TensorBase)",
    "torch.device": "torch/_C/__init__.pyi: class device",
    "torch.dtype": "torch/_C/__init__.pyi: class dtype",
    "torch.distributed.ReduceOp": "torch/_C/_distributed_c10d.pyi: class ReduceOp",
    "torch.ops": "torch/_ops.py: ops = _Ops()",
    "torch.ops.mkldnn": "torch/_ops.py: operator namespaces resolve at run time",
    "torch.ops.mkldnn._is_mkldnn_bf16_supported": "called by torch/testing/_internal/common_mkldnn.py",
    "torchvision.io.ImageReadMode.GRAY": "torchvision/io/image.py: GRAY = 1",
    "torchvision.io.ImageReadMode.RGB": "torchvision/io/image.py: RGB = 3",
    "torchvision.transforms.InterpolationMode.BICUBIC": "torchvision/transforms/functional.py: BICUBIC",
    "torchvision.transforms.v2.InterpolationMode.BICUBIC": "torchvision/transforms/functional.py: BICUBIC",
}


def _files(args: list[str]) -> list[Path]:
    out = []
    for a in args or DEFAULT:
        p = ROOT / a
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.exists() else []
    return out


def uses(path: Path) -> dict[str, set[str]]:
    """dotted name -> keywords passed where it is called, for names rooted in torch / torchvision."""
    tree = ast.parse(path.read_text(), str(path))
    alias: dict[str, str] = {}
    found: dict[str, set[str]] = defaultdict(set)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in TOP:
                    alias[(a.asname or a.name).split(".")[0] if not a.asname else a.asname] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in TOP:
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
                found[f"{node.module}.{a.name}"]

    def dotted(n: ast.AST) -> str | None:
        parts = []
        while isinstance(n, ast.Attribute):
            parts.append(n.attr)
            n = n.value
        if isinstance(n, ast.Name) and n.id in alias:
            return ".".join([alias[n.id], *reversed(parts)])
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if name:
                found[name] |= {k.arg for k in node.keywords if k.arg}
        elif isinstance(node, ast.Attribute) and (name := dotted(node)):
            found[name]
    return found


def resolve(name: str):
    """The installed object for a dotted name, or None."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
        except AttributeError:
            return None
        return obj
    return None


def _defined(tree: ast.Module, qualname: str) -> ast.AST | None:
    body: list[ast.stmt] = tree.body
    node = None
    for part in qualname.split("."):
        node = None
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and stmt.name == part:
                node = stmt
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)) and part in {
                    t.id for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]) if isinstance(t, ast.Name)}:
                node = stmt
            elif isinstance(stmt, (ast.If, ast.Try)):  # definitions under a version or import guard
                inner = ast.Module(body=[*stmt.body, *getattr(stmt, "orelse", []), *getattr(stmt, "finalbody", [])], type_ignores=[])
                node = node or _defined(inner, part)
        if node is None:
            return None
        body = getattr(node, "body", [])
    return node


def _params(node: ast.AST) -> tuple[set[str], bool]:
    if isinstance(node, ast.ClassDef):
        init = next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
        return _params(init) if init else (set(), True)  # inherited __init__: not checked here
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return set(), True
    a = node.args
    return {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]}, a.kwarg is not None


def check(name: str, keywords: set[str], old: Path) -> str | None:
    if name in BY_HAND:
        return None
    obj = resolve(name)
    if obj is None:
        return None  # not in the installed release either (a guarded newer name, or a string): nothing to compare
    if inspect.ismodule(obj):
        rel = Path(*obj.__name__.split("."))
        ok = (old / f"{rel}.py").exists() or (old / rel / "__init__.py").exists()
        return None if ok else f"{name}: module missing"
    target = inspect.unwrap(obj) if callable(obj) else obj
    try:
        src = inspect.getsourcefile(target)
    except TypeError:
        src = None
    if src is None or "site-packages" not in src:  # compiled: look in the stubs
        leaf = name.rsplit(".", 1)[-1]
        stubs = " ".join(p.read_text(errors="replace") for p in (old / "torch" / "_C").glob("*.pyi"))
        stubs += (old / "torch" / "__init__.py").read_text()
        if leaf.startswith("__") or f"def {leaf}(" in stubs or f"{leaf}:" in stubs or f" {leaf} =" in stubs \
                or f"{leaf}" in (old / "torch" / "_C" / "_VariableFunctions.pyi").read_text():
            return None
        mod = name.rsplit(".", 1)[0].replace(".", "/")
        for f in (old / f"{mod}.py", old / mod / "__init__.py", old / f"{mod}.pyi"):
            if f.exists() and leaf in f.read_text(errors="replace"):
                return None
        return f"{name}: not found in the stubs"
    rel = Path(src[src.index("site-packages") + len("site-packages") + 1:])
    old_file = old / rel
    if not old_file.exists():
        return f"{name}: {rel} missing"
    qual = getattr(target, "__qualname__", name.rsplit(".", 1)[-1])
    if "<" in qual:  # a lambda or local: its module exists, nothing more to see
        return None
    node = _defined(ast.parse(old_file.read_text(errors="replace")), qual)
    if node is None:
        return f"{name}: {qual} not defined in {rel}"
    params, open_kw = _params(node)
    lacking = sorted(k for k in keywords if k not in params)
    if lacking and not open_kw:
        return f"{name}: keyword(s) {', '.join(lacking)} missing in {rel}"
    return None


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    old = Path(sys.argv[1])
    sys.path.insert(0, str(ROOT))
    names: dict[str, set[str]] = defaultdict(set)
    for f in _files(sys.argv[2:]):
        for n, kws in uses(f).items():
            names[n] |= kws
    problems = [p for n in sorted(names) if (p := check(n, names[n], old))]
    import torch
    import torchvision

    print(f"{len(names)} torch / torchvision names checked: installed torch {torch.__version__}, torchvision "
          f"{torchvision.__version__} against {old}")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
