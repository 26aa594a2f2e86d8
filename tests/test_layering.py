"""The house's layering, read from the source: no import circle, and every barlow import goes down a layer.

Function-level imports count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "barlow"

# Lower layers first; a module may import modules of strictly lower layers, and modules of its own package
# (barlow.data.*, barlow.launch.*, barlow.cli.*) as long as no circle forms. The longest matching prefix decides.
LAYERS: list[tuple[str, ...]] = [
    ("barlow.spec", "barlow.errors", "barlow.storage", "barlow.trainer_status", "barlow.goodput",
     "barlow.model", "barlow.loss", "barlow.optim"),
    ("barlow.distributed", "barlow.syncbn", "barlow.checkpoint", "barlow.metrics", "barlow.torchrun", "barlow.data", "barlow.tracking",
     "barlow.lease"),
    ("barlow.augment",),  # decodes with barlow.data's host side (decode, cropfirst, handover)
    ("barlow.data.feed", "barlow.data.devicedecode"),  # barlow.data's device side: applies the augment's views
    ("barlow.restarts",),
    ("barlow.status",),
    ("barlow.runsetup",),
    ("barlow.knn",),
    ("barlow.evaluate", "barlow.monitors"),  # side by side: training needs no eval stage, the eval no monitor
    ("barlow.train",),
    ("barlow.entrypoint",),
    ("barlow.launch",),
    ("barlow.cli",),
]
# The runtime never needs the launcher, and the launcher never needs the training code (a manifest renders without
# a GPU stack).
RUNTIME = ("barlow.distributed", "barlow.syncbn", "barlow.checkpoint", "barlow.metrics", "barlow.data", "barlow.restarts", "barlow.runsetup",
           "barlow.status", "barlow.knn", "barlow.evaluate", "barlow.monitors", "barlow.train", "barlow.entrypoint", "barlow.model",
           "barlow.loss", "barlow.optim", "barlow.augment", "barlow.tracking", "barlow.goodput", "barlow.trainer_status")
TRAINING_CODE = ("barlow.distributed", "barlow.syncbn", "barlow.runsetup", "barlow.knn", "barlow.evaluate", "barlow.monitors",
                 "barlow.train", "barlow.tracking",
                 "barlow.entrypoint", "barlow.model", "barlow.loss", "barlow.optim", "barlow.augment", "barlow.data.feed",
                 "barlow.data.devicedecode")


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The barlow module `name` refers to (`from barlow.data import layout` names barlow.data.layout)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] or [base]
        else:
            continue
        for n in names:
            if n == "barlow" or n.startswith("barlow."):
                target = _resolve(n, modules)
                if target and target != me:
                    found.add(target)
    return found


def _layer(module: str) -> int:
    matches = [(len(p), i) for i, prefixes in enumerate(LAYERS) for p in prefixes
               if module == p or module.startswith(p + ".")]
    return max(matches)[1] if matches else -1


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


GRAPH = {m: _imports(p, _modules()) for m, p in _modules().items()}


def test_every_module_has_a_layer():
    """A new module is placed in the house on purpose (add it to LAYERS)."""
    assert [m for m in GRAPH if m != "barlow" and _layer(m) < 0] == []


def test_imports_go_down_a_layer():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
              if m != "barlow" and t != "barlow" and _package(m) != _package(t) and _layer(t) >= _layer(m)]
    assert upward == []


@pytest.mark.parametrize(("importers", "forbidden"), [(RUNTIME, ("barlow.launch", "barlow.cli")),
                                                      (("barlow.launch",), TRAINING_CODE)])
def test_forbidden_imports(importers, forbidden):
    hits = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
            if m.startswith(importers) and t.startswith(forbidden)]
    assert hits == []


def test_no_import_circle():
    seen: dict[str, int] = {}  # 1 on the current path, 2 done
    circles: list[str] = []

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for t in sorted(GRAPH.get(m, ())):
            if t == "barlow" or t == m:
                continue
            if seen.get(t) == 1:
                circles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in seen:
                visit(t, path + [t])
        seen[m] = 2

    for m in sorted(GRAPH):
        if m not in seen:
            visit(m, [m])
    assert circles == []
