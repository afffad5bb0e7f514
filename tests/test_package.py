"""How the package hangs together: library code never imports a top-level script (issue 14)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stjax"
SCRIPTS = ("stjax.demo", "benchmarks", "convert", "launch", "tests")  # run by users, not imported by the library


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
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
