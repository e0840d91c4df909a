"""Child processes read from /proc: who descends from a process, and their resident memory.

Backends that run their model in child processes (vLLM's engine core and workers)
need two facts the kernel already keeps: which processes belong to an instance, and
how much memory they hold. Reading /proc directly costs a few files per process and
spares routerd a dependency.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")


def _parent_of(stat_text: str) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may itself hold spaces or ")".
    return int(stat_text[stat_text.rindex(")") + 2 :].split()[1])


def parents(proc: Path = PROC) -> dict[int, int]:
    """pid → parent pid for every process readable now."""
    table: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            table[int(entry.name)] = _parent_of((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked, or not ours to read
    return table


def descendants(pid: int, proc: Path = PROC) -> set[int]:
    """Every living process below ``pid`` (children, their children, …)."""
    children: dict[int, list[int]] = {}
    for child, parent in parents(proc).items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    stack = list(children.get(pid, []))
    while stack:
        p = stack.pop()
        if p not in found:
            found.add(p)
            stack.extend(children.get(p, []))
    return found


def rss_bytes(pid: int, proc: Path = PROC) -> int:
    """Resident memory of one process (0 once it is gone)."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def tree_rss_bytes(roots: Iterable[int], proc: Path = PROC) -> int:
    """Resident memory of ``roots`` and everything below them."""
    pids: set[int] = set()
    for root in roots:
        pids.add(root)
        pids |= descendants(root, proc)
    return sum(rss_bytes(p, proc) for p in pids)


def alive(pid: int) -> bool:
    """Whether ``pid`` still exists and is not a zombie."""
    try:
        state = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2 :].split()[0] != "Z"


def own_children() -> set[int]:
    """This process's descendants now."""
    return descendants(os.getpid())
