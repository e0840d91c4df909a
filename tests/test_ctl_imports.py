"""routerctl starts fast and its modules stay layered.

``routerctl`` runs on operators' shells and in scripts: importing it must not pull in
torch, transformers, aiohttp or routerd's backends. And the modules of ``routerd.ctl``
import each other without a cycle, at module level only, so no cycle hides behind an
import inside a function.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "routerd.ctl"
HEAVY = ("torch", "transformers", "aiohttp", "backends", "vllm")


def test_importing_routerctl_loads_nothing_heavy() -> None:
    probe = (
        "import routerd.ctl, sys; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {set(HEAVY)!r}))"
    )
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def package_sources() -> dict[str, str]:
    """Module name → source, for every module of ``routerd.ctl``."""
    folder = ROOT.joinpath(*PACKAGE.split("."))
    sources = {}
    for path in sorted(folder.glob("*.py")):
        name = PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"
        sources[name] = path.read_text()
    return sources


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Which of the given modules each one imports (``sources``' keys are module names)."""
    graph: dict[str, set[str]] = {}
    for module, source in sources.items():
        is_package = any(m.startswith(module + ".") for m in sources)
        imported: set[str] = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, is_package, node.module, node.level)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    imported.add(submodule if submodule in sources else base)
        graph[module] = {m for m in imported if m in sources and m != module}
    return graph


def _absolute(module: str, is_package: bool, name: str | None, level: int) -> str:
    """The absolute module of ``from <level dots><name> import ...`` inside ``module``."""
    if level == 0:
        return name or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, *([name] if name else [])])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported, [*path, module])
            if cycle:
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None


def imports_inside_functions(source: str) -> list[int]:
    """Line numbers of import statements inside a function (or method)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines += [
                inner.lineno
                for inner in ast.walk(node)
                if isinstance(inner, ast.Import | ast.ImportFrom)
            ]
    return sorted(lines)


def test_the_package_modules_import_each_other_without_a_cycle() -> None:
    graph = import_graph(package_sources())
    # The graph is read right: both spellings of an import within the package count.
    assert {f"{PACKAGE}.client", f"{PACKAGE}.traffic"} <= graph[f"{PACKAGE}.commands"]
    assert f"{PACKAGE}.commands" in graph[PACKAGE]
    assert find_cycle(graph) is None


@pytest.mark.parametrize("module", sorted(package_sources()))
def test_no_import_hides_inside_a_function(module: str) -> None:
    assert imports_inside_functions(package_sources()[module]) == []


def test_the_checks_catch_what_they_look_for() -> None:
    cyclic = {
        "pkg": "from pkg.a import f\n",
        "pkg.a": "from pkg import b\n\ndef f():\n    return b\n",
        "pkg.b": "def g():\n    from . import a\n    return a\n",
    }
    assert find_cycle(import_graph(cyclic)) == ["pkg.a", "pkg.b", "pkg.a"]
    assert imports_inside_functions(cyclic["pkg.b"]) == [2]
    assert find_cycle(import_graph({**cyclic, "pkg.b": "import os\n"})) is None
