"""The scheduler's shape, read from its source: the rules that keep it easy to change.

- Lifecycle alone moves instances between states and adds them to or removes them
  from the residency table (DESIGN.md rule 1).
- Nothing in the scheduler reads time or waits except through its injected clock,
  so the same code runs on virtual time.
- Its modules stay small: at most ~600 lines, no function over ~60.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCHEDULER = ROOT / "routerd" / "scheduler"
LIFECYCLE = SCHEDULER / "lifecycle.py"
DAEMON = sorted((ROOT / "routerd").rglob("*.py")) + sorted((ROOT / "backends").rglob("*.py"))

# Calls that change which instances exist or what state they are in, by the attribute
# called and the name of the object it is called on (``None``: any object).
TABLE_CHANGES = {
    ("move_to", None),
    ("add", "residency"),
    ("remove", "residency"),
    ("append", "leaks"),
    ("remove", "leaks"),
    ("append", "retiring"),
    ("remove", "retiring"),
}

# What reads time or waits behind the clock's back.
HIDDEN_TIME = {
    ("asyncio", "sleep"),
    ("asyncio", "wait_for"),
    ("asyncio", "timeout"),
    ("time", "time"),
    ("time", "monotonic"),
    ("time", "sleep"),
    ("loop", "call_later"),
    ("loop", "call_at"),
}


def _owner(node: ast.expr) -> str | None:
    """The last name of the object an attribute is read on: ``self._residency`` → residency."""
    if isinstance(node, ast.Name):
        return node.id.lstrip("_")
    if isinstance(node, ast.Attribute):
        return node.attr.lstrip("_")
    return None


def _calls(path: Path) -> list[tuple[str, str | None, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            found.append((node.func.attr, _owner(node.func.value), node.lineno))
    return found


def test_only_lifecycle_changes_which_instances_exist_and_their_states() -> None:
    offenders = []
    for path in DAEMON:
        if path == LIFECYCLE:
            continue
        for attr, owner, line in _calls(path):
            if (attr, None) in TABLE_CHANGES or (attr, owner) in TABLE_CHANGES:
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {owner}.{attr}(...)")
    assert offenders == []
    lifecycle_calls = {(attr, owner) for attr, owner, _ in _calls(LIFECYCLE)}
    assert ("move_to", "instance") in lifecycle_calls and ("add", "residency") in lifecycle_calls


def test_state_is_never_assigned_outside_the_instance() -> None:
    offenders = []
    for path in DAEMON:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign | ast.AugAssign):
                targets = [node.target]
            else:
                targets = []
            for target in targets:
                assigns_state = isinstance(target, ast.Attribute) and target.attr in (
                    "state",
                    "_state",
                )
                its_own = path.name == "instance.py"  # __init__ and move_to
                if assigns_state and not its_own:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("path", sorted(SCHEDULER.glob("*.py")), ids=lambda p: p.name)
def test_the_scheduler_waits_only_on_its_clock(path: Path) -> None:
    hidden = [
        f"{owner}.{attr} at line {line}"
        for attr, owner, line in _calls(path)
        if (owner, attr) in HIDDEN_TIME
    ]
    assert hidden == []
    assert "import time" not in path.read_text()


@pytest.mark.parametrize("path", sorted(SCHEDULER.glob("*.py")), ids=lambda p: p.name)
def test_scheduler_modules_and_functions_stay_small(path: Path) -> None:
    source = path.read_text()
    assert source.count("\n") <= 600
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None
            assert node.end_lineno - node.lineno + 1 <= 60, f"{node.name} is too long"
