"""The servers a benchmark starts: a subprocess on a loopback port, waited for, stopped.

Shared by ``router_overhead.py`` (routerd and a bare aiohttp server),
``vllm_overhead.py`` (routerd and ``vllm serve``) and ``soak.py`` (``routerd serve
--demo``, started twice). Each server writes its output to a log file, whose tail is
shown when it exits early or never gets ready. ``new_loop`` is the event loop kind
routerd serves on, for the benchmarks that serve or measure in process too.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


def new_loop() -> asyncio.AbstractEventLoop:
    """An event loop of the kind routerd serves on: uvloop when installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A subprocess serving on ``port`` of loopback, run from the repository root.

    ``ready_path`` answers 200 once it serves; ``start_timeout`` bounds the wait for
    that; ``env`` adds to the environment (the repository root is put on
    ``PYTHONPATH`` always); ``append_log`` keeps what an earlier process of the same
    server wrote to ``log_path``; ``root`` is the checkout it runs from (another
    commit's, for a benchmark's baseline).
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        log_path: Path,
        *,
        ready_path: str = "/ready",
        start_timeout: float = 60.0,
        poll_s: float = 0.1,
        env: Mapping[str, str] | None = None,
        append_log: bool = False,
        root: Path = ROOT,
    ) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._ready_path = ready_path
        self._start_timeout = start_timeout
        self._poll_s = poll_s
        environment = {**os.environ, **(env or {})}
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(root), environment.get("PYTHONPATH")])
        )
        self._log = log_path.open("ab" if append_log else "wb")
        self.process = subprocess.Popen(
            argv, cwd=root, env=environment, stdout=self._log, stderr=subprocess.STDOUT
        )

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            try:
                async with session.get(self.url + self._ready_path) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(self._poll_s)
        raise RuntimeError(
            f"{self.name} not ready after {self._start_timeout:.0f}s:\n{self.log_tail()}"
        )

    def cpu_seconds(self) -> float:
        """User + system CPU the process (all its threads) has used; NaN off Linux."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def status_mb(self, key: str) -> float:
        """A ``/proc/PID/status`` figure in MiB (``VmRSS:``, ``VmHWM:``); NaN if absent."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
        return math.nan

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (routerd drains, unloads and exits; a profiler writes its file), then
        SIGKILL if it is still running after ``timeout`` seconds; always reaped."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
