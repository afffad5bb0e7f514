"""How the package hangs together: library code never imports a top-level script (issue 14), and each
floor of the house imports only its own floor and those below it (issue 26)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stjax"
SCRIPTS = ("stjax.demo", "benchmarks", "convert", "launch", "tests")  # run by users, not imported by the library


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (`from a import b`: a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_library_does_not_import_scripts():
    offenders = {
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in PACKAGE.rglob("*.py")
        if path != PACKAGE / "demo.py"
        for name in imported_modules(path)
        if any(name == s or name.startswith(s + ".") for s in SCRIPTS)
    }
    assert not offenders, sorted(offenders)


# The floors of the house, lowest first: a module imports from its own floor and those below, never above.
# (The package's own face, stjax/__init__.py, names the model classes and is left out.)
FLOORS = [
    {"stjax.io", "stjax.settings", "stjax.cli", "stjax.sharding"},  # no model, no data: plumbing
    {"stjax.models"},
    {"stjax.data"},
    {"stjax.sampling", "stjax.compile_only"},
    {"stjax.eval", "stjax.train"},  # the training reward reads answers as the evaluator does; the
    # evaluator's --compile-only counts FLOPs as training does
    {"stjax.convert", "stjax.demo"},  # the tools on top
]


def floor_of(module: str) -> int:
    """The floor of `stjax.<part>[.more]` (its top-level part's)."""
    top = ".".join(module.split(".")[:2])
    return next(i for i, floor in enumerate(FLOORS) if top in floor)


def test_no_module_imports_a_floor_above_its_own():
    """E.g. a model file importing the training config, or the data loader importing the evaluator."""
    paths = [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"]
    assert {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts[:2]) for p in paths} <= set().union(*FLOORS)
    offenders = set()
    for path in paths:
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for name in imported_modules(path):
            if name.startswith("stjax.") and floor_of(name) > floor_of(module):
                offenders.add(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not offenders, sorted(offenders)
