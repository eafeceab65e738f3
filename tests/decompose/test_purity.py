"""The decomposition core stays pure: numpy, scipy, the standard library and factorlm.errors only.

``factorlm.decompose`` is plain functions over arrays (DESIGN.md): no onnx, torch or graph code,
and no other factorlm package, so it can be read, tested and reused alone. Every import, at any
depth (functions and ``TYPE_CHECKING`` blocks included), is checked from the source text.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import factorlm.decompose

DECOMPOSE = Path(factorlm.decompose.__file__).parent
ALLOWED_ROOTS = {"numpy", "scipy"}
ALLOWED_FACTORLM = ("factorlm.errors", "factorlm.decompose")


def _package_of(path: Path) -> str:
    """The package a relative import in ``path`` starts from."""
    parts = path.relative_to(DECOMPOSE.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1])


def _imports(source: str, package: str) -> list[tuple[int, str]]:
    """``(line, absolute module)`` for every import statement in ``source``, in line order."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved inside factorlm.decompose
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return sorted(found)


def _allowed(module: str) -> bool:
    root = module.split(".")[0]
    if root in ALLOWED_ROOTS or root in sys.stdlib_module_names:
        return True
    return any(module == name or module.startswith(f"{name}.") for name in ALLOWED_FACTORLM)


def _modules() -> list[Path]:
    return sorted(DECOMPOSE.rglob("*.py"))


def test_the_core_has_modules_to_check() -> None:
    names = {p.name for p in _modules()}
    assert {"__init__.py", "svd.py", "rank.py", "kronecker.py"} <= names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_decompose_module_imports_only_numpy_scipy_stdlib_and_errors(path: Path) -> None:
    bad = [
        f"{path.name}:{line} imports {mod}"
        for line, mod in _imports(path.read_text(encoding="utf-8"), _package_of(path))
        if not _allowed(mod)
    ]
    assert not bad, "factorlm.decompose must stay pure numpy/scipy:\n" + "\n".join(bad)


def test_the_checker_refuses_what_the_core_must_not_import() -> None:
    sample = (
        "import numpy as np\nfrom . import svd\nfrom factorlm.errors import FactorlmError\n"
        "def f():\n    import torch\n    from factorlm.passes import analyze\n"
        "from ..planning import Plan\n"
    )
    found = _imports(sample, "factorlm.decompose")
    assert (2, "factorlm.decompose") in found  # ``from . import svd`` stays inside the core
    refused = [m for _, m in found if not _allowed(m)]
    assert refused == ["torch", "factorlm.passes", "factorlm.planning"]
