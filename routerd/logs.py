"""Structured logs: one line per record, ``key=value`` (logfmt) or JSON, for journald.

A record's message is written as ``msg``; fields passed with ``extra=`` become keys
of their own (``event``, ``model``, ``device``, ``reason``, ``bytes``…) so a load,
an eviction or a request error can be found with a filter rather than a regex.
Under systemd (``$JOURNAL_STREAM`` set) the timestamp is left out: journald adds
its own.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Final

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The record as ordered fields: time, level, logger, msg, then its extras."""
    fields: dict[str, Any] = {}
    if "JOURNAL_STREAM" not in os.environ:
        fields["ts"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)) + (
            f".{int(record.msecs):03d}"
        )
    fields["level"] = record.levelname.lower()
    fields["logger"] = record.name
    fields["msg"] = record.getMessage()
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_") and value is not None:
            fields[key] = value
    if record.exc_info:
        fields["error"] = logging.Formatter().formatException(record.exc_info)
    return fields


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=info logger=routerd.scheduler msg="loaded …" model=a@1``."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt(value)}" for key, value in fields_of(record).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(fields_of(record), default=str)


def _logfmt(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c in text for c in ' ="\\\n\t'):
        return text
    return json.dumps(text)  # quoted, with quotes, backslashes and newlines escaped


def configure(level: str, fmt: str) -> None:
    """Make the root logger write ``fmt`` (``text`` or ``json``) at ``level`` to stderr.

    Called at start and again on reload; replaces the handler it installed before.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_routerd", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._routerd = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
