"""The SQLite file locked by another process: a clear error, retried, nothing lost.

A real second process takes the database's write lock (``BEGIN EXCLUSIVE``) and holds
it until told to let go. Meanwhile an operator write fails with a 503 that says the
file is locked; a model still loads and serves (its event waits in memory); once the
lock is gone the operator's retry succeeds, the kept event is written, and the file
passes ``PRAGMA integrity_check``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time

from aiohttp.test_utils import TestClient, TestServer

from routerd.api.keys import SERVICES
from routerd.app import build_app
from tests.fakes import FakeBackend
from tests.support import ADMIN_AUTH, fake_services, fake_spec

LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
if len(sys.argv) > 2:
    time.sleep(float(sys.argv[2]))
else:
    sys.stdin.readline()
db.execute("COMMIT")
db.close()
"""


async def test_a_short_lock_is_waited_out(tmp_path):
    services = fake_services(tmp_path, FakeBackend(), [fake_spec(tmp_path, "a")], busy_timeout=5.0)
    async with TestClient(TestServer(build_app(services)), headers=ADMIN_AUTH) as client:
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(services.live.config.database_path), "0.3"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        started = time.monotonic()
        pinned = await client.post("/admin/pin", json={"model": "a"})
        assert pinned.status == 200
        assert time.monotonic() - started >= 0.1, "it waited for the other process"
        assert locker.wait(timeout=10) == 0
        assert services.store.is_pinned("a", "1")


async def test_a_locked_database_is_a_clear_503_and_nothing_is_lost(tmp_path):
    services = fake_services(
        tmp_path,
        FakeBackend(),
        [fake_spec(tmp_path, "a")],
        busy_timeout=0.3,
        devices_config={"poll_interval": 0.05},
    )
    database = services.live.config.database_path
    async with TestClient(TestServer(build_app(services)), headers=ADMIN_AUTH) as client:
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(database)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
            refused = await client.post("/admin/pin", json={"model": "a"})
            assert refused.status == 503
            assert refused.headers["Retry-After"] == "1"
            error = (await refused.json())["error"]
            assert error["code"] == "store_unavailable"
            assert "locked by another connection" in error["message"]
            served = await client.post("/v1/completions", json={"model": "a", "prompt": "hi"})
            assert served.status == 200, "a load does not fail for want of its log line"
            journal = client.app[SERVICES].scheduler.context.journal
            assert journal.unrecorded, "its event is kept for later"
            assert (await client.get("/v1/models")).status == 200, "reads go on meanwhile"
        finally:
            assert locker.stdin is not None
            locker.stdin.write("\n")
            locker.stdin.flush()
            assert locker.wait(timeout=10) == 0
        pinned = await client.post("/admin/pin", json={"model": "a"})
        assert pinned.status == 200 and (await pinned.json())["pinned"] is True
        async with asyncio.timeout(5):  # the kept load event is written by the next poll
            while True:
                events = await (await client.get("/admin/events?model=a")).json()
                if [e["kind"] for e in events["events"]] == ["load"]:
                    break
                await asyncio.sleep(0.05)
        assert client.app[SERVICES].store.is_pinned("a", "1")
    with sqlite3.connect(database) as check:
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
