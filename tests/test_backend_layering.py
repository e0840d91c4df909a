"""The backends package's place in the layers, read from its source.

Backends sit below the daemon: ``routerd`` imports ``backends``, never the other way,
so a backend can be loaded, tested and reused without the scheduler or the HTTP API.
An import of ``routerd`` anywhere in ``backends/`` (at module level or inside a
function, where a lazy import would hide it from a quick look) breaks that.

Its modules also stay small (at most ~600 lines), each with one responsibility.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = sorted((ROOT / "backends").rglob("*.py"))
FORBIDDEN = "routerd"
MAX_LINES = 600


def _names_a_forbidden_module(module: str) -> bool:
    return module == FORBIDDEN or module.startswith(FORBIDDEN + ".")


def forbidden_imports(source: str) -> list[str]:
    """``line: statement`` for every import of ``routerd`` in ``source``, wherever it sits.

    Covers ``import routerd…``, ``from routerd… import …`` and ``importlib.import_module``
    or ``__import__`` called with a literal ``routerd…`` name.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            names = [node.module]
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            first = node.args[0]
            is_text = isinstance(first, ast.Constant) and isinstance(first.value, str)
            names = [first.value] if is_text else []
        else:
            continue
        found += [
            f"{node.lineno}: {ast.unparse(node)}" for n in names if _names_a_forbidden_module(n)
        ]
    return found


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def test_the_backend_modules_are_found() -> None:
    names = {path.name for path in BACKENDS}
    assert {"base.py", "registry.py", "vllm.py", "hf_transformers.py", "proctree.py"} <= names


@pytest.mark.parametrize("path", BACKENDS, ids=lambda p: str(p.relative_to(ROOT)))
def test_backends_never_import_routerd(path: Path) -> None:
    assert forbidden_imports(path.read_text()) == []


@pytest.mark.parametrize(
    "source",
    [
        "import routerd",
        "import routerd.proctree as proctree",
        "import os, routerd.devices",
        "from routerd import proctree",
        "from routerd.scheduler.residency import Residency",
        "def load():\n    from routerd.devices import DeviceInventory\n",
        "class Model:\n    def unload(self):\n        import routerd.memory\n",
        "import importlib\nimportlib.import_module('routerd.devices')",
        "__import__('routerd')",
    ],
)
def test_each_way_of_importing_routerd_is_caught(source: str) -> None:
    assert len(forbidden_imports(source)) == 1


@pytest.mark.parametrize(
    "source",
    [
        "import routerdish",
        "from backends import proctree",
        "from . import base",
        "log = logging.getLogger('routerd.backends')",
        "import_module(name)",
    ],
)
def test_names_that_only_resemble_routerd_pass(source: str) -> None:
    assert forbidden_imports(source) == []


@pytest.mark.parametrize("path", BACKENDS, ids=lambda p: str(p.relative_to(ROOT)))
def test_backend_modules_stay_small(path: Path) -> None:
    assert path.read_text().count("\n") <= MAX_LINES
