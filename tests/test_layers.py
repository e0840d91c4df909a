"""The layers hold: import-linter's contracts (pyproject.toml) pass, and handlers
reach the daemon's parts through their own keys, never the whole bag of services.

``make lint`` runs import-linter too; running it here makes the suite (and so CI)
refuse a change that breaks a layer.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")
def test_every_import_contract_is_kept() -> None:
    done = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout and "BROKEN" not in done.stdout


def _names(path: Path) -> set[str]:
    return {node.id for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Name)}


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (ROOT / "routerd" / "api").glob("*.py") if p.name != "keys.py"),
    ids=lambda p: p.name,
)
def test_handlers_use_their_own_keys_not_the_services_bag(path: Path) -> None:
    assert "SERVICES" not in _names(path)
    assert "Services" not in _names(path)
