"""Opening the SQLite file, write transactions, and turning SQLite failures into words.

Why these settings:

- **WAL journal**: readers (``routerctl`` through the API, the health check) never wait
  for a writer, and a crash mid-write leaves the last committed state intact.
- **Foreign keys on**: SQLite leaves them off per connection unless asked; the schema
  relies on them (a version cannot exist without its model row).
- **Busy timeout** (5 s by default): a second process holding the write lock makes us
  wait a little, then fail with a clear "locked" error instead of hanging forever.
- **Driver autocommit** (``isolation_level=None``): Python's ``sqlite3`` never opens a
  transaction behind our back; every write happens inside ``write_transaction``, which
  starts with ``BEGIN IMMEDIATE`` so it takes the write lock *before* reading what it
  will change (a deferred transaction that upgrades to a writer can fail on WAL
  snapshots without waiting). sqlite-utils' own helpers nest inside it as savepoints.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from sqlite_utils import Database

BUSY_TIMEOUT_S: Final = 5.0


def connect(path: Path, *, busy_timeout: float = BUSY_TIMEOUT_S) -> Database:
    """Open ``path`` (created if missing) with the settings above; close it again on failure.

    Raises ``sqlite3.Error`` (for ``describe``) when the file cannot be used, e.g. it is
    not a database: SQLite only notices that on the first statement, which is here.
    """
    conn = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None)
    try:
        db = Database(conn, execute_plugins=False)
        db.enable_wal()
        db.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return db


@contextmanager
def write_transaction(db: Database) -> Iterator[Database]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``; rolled back if the block raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.rollback()
        raise
    try:
        db.execute("COMMIT")
    except BaseException:
        db.rollback()
        raise


def describe(exc: sqlite3.Error, path: Path, action: str, *, busy_timeout: float) -> str:
    """A message for ``StoreError``: what we were doing, what is wrong, what to do."""
    code = getattr(exc, "sqlite_errorname", "") or ""  # Python 3.11+
    text = str(exc)
    if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        why = (
            f"{path} is locked by another connection (waited {busy_timeout:g} s); "
            "is another routerd using the same state dir?"
        )
    elif code == "SQLITE_NOTADB" or "not a database" in text:
        why = (
            f"{path} is not a SQLite database ({text}); "
            "move it aside or point the state dir elsewhere"
        )
    elif code.startswith("SQLITE_CORRUPT") or "malformed" in text:
        why = f"{path} is corrupt ({text}); restore it from a backup or move it aside"
    elif code.startswith("SQLITE_READONLY") or "readonly" in text:
        why = f"{path} cannot be written ({text}); check the permissions of it and its directory"
    elif code.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
        why = f"cannot open {path} ({text}); check that its directory exists and is writable"
    elif code.startswith("SQLITE_FULL") or "disk is full" in text:
        why = f"the disk holding {path} is full ({text})"
    else:
        why = f"{text} ({path})"
    return f"{action} failed: {why}"
