"""Structured logs: key=value and JSON lines carrying a record's extra fields."""

from __future__ import annotations

import json
import logging

import pytest

from routerd import logs


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("routerd.scheduler", logging.INFO, __file__, 1, msg, (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_key_value_lines_quote_what_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")  # journald adds its own timestamp
    line = logs.KeyValueFormatter().format(
        _record("loaded a@1 on cpu", event="load", model="a@1", bytes=1000, trigger=None)
    )
    assert line == (
        'level=info logger=routerd.scheduler msg="loaded a@1 on cpu" event=load model=a@1 '
        "bytes=1000"
    )
    assert "\n" not in logs.KeyValueFormatter().format(_record('two\nlines "quoted"'))


def test_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    parsed = json.loads(
        logs.JsonFormatter().format(_record("evicted", event="evict", reason="lru", resident_s=2.5))
    )
    assert {k: parsed[k] for k in ("level", "msg", "event", "reason", "resident_s")} == {
        "level": "info",
        "msg": "evicted",
        "event": "evict",
        "reason": "lru",
        "resident_s": 2.5,
    }
    assert "ts" in parsed


def test_configure_replaces_its_own_handler_only() -> None:
    root = logging.getLogger()
    before = [h for h in root.handlers if not getattr(h, "_routerd", False)]
    level = root.level
    try:
        logs.configure("warning", "json")
        logs.configure("debug", "text")
        ours = [h for h in root.handlers if getattr(h, "_routerd", False)]
        assert len(ours) == 1 and isinstance(ours[0].formatter, logs.KeyValueFormatter)
        assert root.level == logging.DEBUG
        assert [h for h in root.handlers if h not in ours] == before
    finally:
        for handler in [h for h in root.handlers if getattr(h, "_routerd", False)]:
            root.removeHandler(handler)
        root.setLevel(level)
