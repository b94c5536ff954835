"""The import graph of qflow/ and stages/ follows the layers of the architecture.

Layers, top to bottom; a module may import its own layer or any layer below,
never one above (docs/ARCHITECTURE.md §2)::

    qflow/cli.py, qflow/api.py > qflow/engine/ > stages/ > qflow/evaluation/ > qflow/export/
    > qflow/quant/algos/ (and qflow/finetune/) > qflow/models/ > qflow/data/ > qflow/quant/ (core)
    > qflow/kernels/ > foundations (qflow/recipe/, registry, artifacts, specs, units, tracking, errors,
      fingerprint, source_common)

and the engine knows nothing about quantization: it imports only the engine,
stages and the foundations. Every ``import`` statement counts, those inside
functions included (a lazy import is still a dependency). The layers form one
order, so a cycle between two layers always contains an upward import:
checking the upward imports finds every cycle, and the failure message marks
the imports that close one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qflow", "stages")

# module prefix -> layer, 0 the top; the longest matching prefix wins
LAYERS = {
    "qflow.cli": 0,
    "qflow.api": 0,   # the Python API; the CLI is a thin layer over it
    "qflow.engine": 1,
    "stages": 2,
    "qflow.evaluation": 3,
    "qflow.export": 4,
    "qflow.quant.algos": 5,
    "qflow.finetune": 5,   # fine-tune methods sit beside the quantize algorithms
    "qflow.models": 6,
    "qflow.data": 7,
    "qflow.quant": 8,
    "qflow.kernels": 9,
    "qflow.recipe": 10,
    "qflow.registry": 10,
    "qflow.artifacts": 10,
    "qflow.specs": 10,
    "qflow.units": 10,
    "qflow.tracking": 10,
    "qflow.errors": 10,
    "qflow.fingerprint": 10,
    "qflow.source_common": 10,
    "qflow": 10,  # the package root: __version__
}
LAYER_NAMES = ("cli", "engine", "stages", "evaluation", "export", "quant.algos", "models", "data", "quant core",
               "kernels", "foundations")
ENGINE_MAY_IMPORT = {LAYERS["qflow.engine"], LAYERS["stages"], LAYERS["qflow.errors"]}

# being removed in issue 12: known violations that other changes are taking out now
# (quant core <-> models, registry -> stages, specs -> data, data.sources -> models.sources,
# engine -> models/quant/evaluation): all removed. Nothing may be added.
ALLOWED: set[tuple[str, str]] = set()

# the package root re-exports the API lazily (PEP 562 ``__getattr__`` in qflow/__init__.py), so that
# ``qflow.run`` works; the root is otherwise a foundation (``__version__``) that any layer may import
FACADE = {("qflow", "qflow.api")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The layer of a qflow/stages module, or None when no prefix matches."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        layer = LAYERS.get(".".join(parts[:end]))
        if layer is not None:
            return layer
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The qflow/stages modules that ``module`` imports anywhere in its file, relative imports resolved."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:  # `from package import submodule` imports the submodule
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, imported) pairs that point up the layers, or from the engine into quantization."""
    bad = set()
    for importer, targets in graph.items():
        for imported in targets:
            upward = layer_of(imported) < layer_of(importer)
            engine = layer_of(importer) == LAYERS["qflow.engine"] and layer_of(imported) not in ENGINE_MAY_IMPORT
            if (upward or engine) and (importer, imported) not in FACADE:
                bad.add((importer, imported))
    return bad


def describe(pairs: set[tuple[str, str]], graph: dict[str, set[str]]) -> str:
    """One line per import; 'cycle' where the imported layer also imports the importer's layer."""
    layer_edges = {(layer_of(m), layer_of(t)) for m, targets in graph.items() for t in targets}
    lines = []
    for importer, imported in sorted(pairs):
        low, high = layer_of(importer), layer_of(imported)
        cycle = " (cycle)" if low != high and (high, low) in layer_edges else ""
        lines.append(f"  {importer} [{LAYER_NAMES[low]}] imports {imported} [{LAYER_NAMES[high]}]{cycle}")
    return "\n".join(lines)


def test_imports_follow_the_layers():
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"modules without a layer (add them to LAYERS): {unplaced}"
    found = violations(graph)
    new = found - ALLOWED
    assert not new, "imports against the layers (see this file's docstring):\n" + describe(new, graph)


def test_allow_list_holds_only_live_violations():
    """A fixed violation leaves ALLOWED at once, so it cannot come back unnoticed."""
    stale = ALLOWED - violations(import_graph())
    assert not stale, f"fixed, so remove them from ALLOWED in {Path(__file__).name}: {sorted(stale)}"


def test_kernels_import_only_kernels_and_foundations():
    """Arrays and plain numbers in: the kernels know no QuantSpec, no table, no dispatcher."""
    graph = import_graph()
    kernels = LAYERS["qflow.kernels"]
    bad = {(m, t) for m, targets in graph.items() if layer_of(m) == kernels for t in targets
           if layer_of(t) not in (kernels, LAYERS["qflow.errors"])}
    assert not bad, describe(bad, graph)
    assert not [pair for pair in ALLOWED if kernels in map(layer_of, pair)], "kernels pairs may not be allowed"


@pytest.mark.parametrize("source, expected", [
    ("from ..quant.spec import QuantSpec", {"qflow.quant.spec"}),
    ("from . import cpu", {"qflow.kernels.cpu"}),
    ("from ..errors import QflowError", {"qflow.errors"}),
    ("import numpy, torch", set()),
    ("import qflow.quant.affine as a", {"qflow.quant.affine"}),
    ("def f():\n    from qflow.kernels import configure_numba, cpu", {"qflow.kernels", "qflow.kernels.cpu"}),
])
def test_imports_are_resolved(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert imports_of("qflow.kernels.probe", path, all_modules()) == expected


def test_an_upward_import_is_reported():
    graph = {"qflow.kernels.cpu": {"qflow.quant.spec"}, "qflow.quant.ir": {"qflow.kernels.cpu"},
             "qflow.engine.runner": {"qflow.quant.memory", "qflow.registry"}, "qflow.cli": {"qflow.engine"}}
    assert violations(graph) == {("qflow.kernels.cpu", "qflow.quant.spec"),
                                 ("qflow.engine.runner", "qflow.quant.memory")}
    assert "(cycle)" in describe({("qflow.kernels.cpu", "qflow.quant.spec")}, graph)
