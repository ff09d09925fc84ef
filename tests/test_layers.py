"""The layering rule, read from the imports of every module (docs/ARCHITECTURE.md, "Layers").

ovsam -> labelstudio_io -> training -> labelstudio_backend -> bench: a package imports only packages to its left.
Imports inside functions count too: a deferred import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["ovsam", "labelstudio_io", "training", "labelstudio_backend", "bench"]
# (module file, imported package) pairs that break the rule and are known; each must still be there.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()  # (module path, package it may import against the layering)


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every absolute import in a module (relative imports stay inside its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
                names.add(arg.value.split(".")[0])
    return names


def upward_imports() -> set[tuple[str, str]]:
    found = set()
    for level, package in enumerate(LAYERS):
        above = set(LAYERS[level + 1:])
        for path in sorted((REPO / package).rglob("*.py")):
            for name in imported_packages(path) & above:
                found.add((path.relative_to(REPO).as_posix(), name))
    return found


def test_every_layer_has_modules() -> None:
    for package in LAYERS:
        assert list((REPO / package).rglob("*.py")), package


def test_no_package_imports_a_layer_above_it() -> None:
    found = upward_imports()
    assert found - KNOWN_EXCEPTIONS == set(), "imports of a layer above (see docs/ARCHITECTURE.md)"


def test_known_exceptions_are_still_needed() -> None:
    stale = KNOWN_EXCEPTIONS - upward_imports()
    assert not stale, f"remove these from KNOWN_EXCEPTIONS: {sorted(stale)}"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import training.metrics\n", {"training"}),
        ("def f():\n    from labelstudio_backend.registry import ModelRegistry\n", {"labelstudio_backend"}),
        ("from . import outbound\nfrom .lru import SizedLRU\n", set()),
        ("import importlib\nimportlib.import_module('training.pipeline')\n", {"importlib", "training"}),
    ],
)
def test_imports_are_read_from_every_form(tmp_path: Path, source: str, expected: set[str]) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imported_packages(path) == expected
