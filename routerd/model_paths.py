"""Which folders may be registered as models: only those under the configured roots.

Registering a model makes routerd read files from a path an operator (or a config
file) names. Confining that to ``server.model_roots`` keeps a mistyped or hostile
path from pointing routerd at files it should not read: a path must be absolute,
may not climb with ``..``, and must resolve — symlinks followed — inside a root.
Links inside the folder are followed too, so a checkpoint that is a symlink to
somewhere outside every root is refused as well.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from contract.errors import InvalidRequest

MAX_ENTRIES = 10_000
"""Entries of a model folder looked at for links; a folder with more is refused."""


def check_model_folder(path: str, roots: Sequence[Path]) -> Path:
    """The folder's real path if it lies under one of ``roots``; else InvalidRequest."""
    given = Path(path)
    if not given.is_absolute():
        raise InvalidRequest(f"path must be absolute, got {path!r}", param="path")
    if ".." in given.parts:
        raise InvalidRequest(f"path must not contain '..', got {path!r}", param="path")
    try:
        real = given.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InvalidRequest(f"path {path} does not exist", param="path") from None
    if not real.is_dir():
        raise InvalidRequest(f"path {path} is not a directory", param="path")
    root = _root_of(real, roots)
    if root is None:
        shown = ", ".join(str(r) for r in roots) or "none configured"
        raise InvalidRequest(
            f"path {path} is outside the model roots ({shown}); "
            "put the model under one of them or add its folder to server.model_roots",
            param="path",
        )
    _check_links(real, root)
    return real


def _root_of(real: Path, roots: Sequence[Path]) -> Path | None:
    for root in roots:
        resolved = root.resolve()
        if real == resolved or real.is_relative_to(resolved):
            return resolved
    return None


def _check_links(folder: Path, root: Path) -> None:
    seen = 0
    for current, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            seen += 1
            if seen > MAX_ENTRIES:
                raise InvalidRequest(
                    f"path {folder} holds more than {MAX_ENTRIES} entries; "
                    "is it really a model folder?",
                    param="path",
                )
            entry = Path(current) / name
            if entry.is_symlink() and not entry.resolve().is_relative_to(root):
                raise InvalidRequest(f"{entry} links outside the model root {root}", param="path")
