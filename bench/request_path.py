"""routerd's own code per request, without sockets: routerd's app against a bare app.

``bench/router_overhead.py`` measures whole servers over loopback, where the client,
the kernel and aiohttp's protocol code share two noisy cores with the code under
test. This benchmark isolates what routerd adds: it hands the same ``POST
/v1/completions`` to each app's request handler (``Application._handle``: routing,
the request middleware, the handler, the response object) in one process, and
times CPU per request.

- **routerd**: ``build_services`` + ``build_app`` with one ``echo`` model (batching
  ``none``), as ``routerd serve`` builds them;
- **bare**: an aiohttp app whose handler parses the JSON body and answers with a
  prepared response of the same size.

Requests are built before each timed round (aiohttp's ``make_mocked_request`` with
plain stand-ins for the transport and writer), then handled one after another
(``seq``) and 64 at a time (``c64``). Rounds alternate between the two apps; the
best round of each is kept.

Usage: python bench/request_path.py [--requests 5000] [--rounds 7]

Prints a table, then as its last line one JSON object: ``routerd_us`` and ``bare_us``
(CPU µs per request, sequential), ``added_us`` (their difference), ``app_ratio``
(routerd ÷ bare), and the same at concurrency 64 under ``c64``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from servers import new_loop

from routerd.app import build_app, build_services
from routerd.config import Config, ServerConfig
from state import VersionSpec

BODY = json.dumps(
    {"model": "echo", "prompt": "Say hello to routerd, please.", "max_tokens": 16}
).encode()
HEADERS = {"Content-Type": "application/json", "Content-Length": str(len(BODY))}


class _Transport:
    """What a request asks of its transport: nothing is a socket here."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False


class _Body:
    """The request body, read once, as aiohttp's stream reader hands it over."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def readany(self) -> bytes:
        data, self._data = self._data, b""
        return data

    async def read(self, n: int = -1) -> bytes:
        return await self.readany()

    def at_eof(self) -> bool:
        return not self._data

    def is_eof(self) -> bool:
        return not self._data

    def set_read_chunk_size(self, size: int) -> None:
        pass


_TRANSPORT = _Transport()
_PROTOCOL = SimpleNamespace(
    max_field_size=8190,
    max_line_length=8190,
    max_headers=128,
    transport=_TRANSPORT,
    peername=None,
    sockname=None,
    ssl_context=None,
)
_WRITER = SimpleNamespace(transport=_TRANSPORT)


def _request(app: web.Application) -> web.Request:
    return make_mocked_request(
        "POST",
        "/v1/completions",
        headers=HEADERS,
        payload=_Body(BODY),
        app=app,
        transport=_TRANSPORT,
        protocol=_PROTOCOL,
        writer=_WRITER,
    )


def _bare_app(answer: bytes, headers: dict[str, str]) -> web.Application:
    async def completions(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.Response(body=answer, content_type="application/json", headers=headers)

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


Handle = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _round(app: web.Application, requests: int, concurrency: int) -> float:
    """CPU µs per request for ``requests`` requests, ``concurrency`` at a time."""
    handle: Handle = app._handle
    pending = [_request(app) for _ in range(requests)]

    async def one(request: web.Request) -> None:
        response = await handle(request)
        if response.status != 200:
            raise RuntimeError(f"answered {response.status}")

    started = time.process_time()
    if concurrency == 1:
        for request in pending:
            await one(request)
    else:
        for i in range(0, requests, concurrency):
            await asyncio.gather(*(one(r) for r in pending[i : i + concurrency]))
    return (time.process_time() - started) / requests * 1e6


async def measure(requests: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "echo-model"
        folder.mkdir()
        config = Config(
            state_dir=Path(tmp) / "state",
            server=ServerConfig(model_roots=(Path(tmp),)),
            models=(VersionSpec("echo", "1", "echo", str(folder), {"batching": "none"}),),
        )
        services = build_services(config)
        routerd = build_app(services)
        runner = web.AppRunner(routerd)
        await runner.setup()  # starts the scheduler, as serving does
        try:
            first = await routerd._handle(_request(routerd))
            assert isinstance(first, web.Response) and isinstance(first.body, bytes)
            served = {k: v for k, v in first.headers.items() if k.lower().startswith("x-")}
            bare = _bare_app(first.body, served)
            bare_runner = web.AppRunner(bare)
            await bare_runner.setup()
            for app in (routerd, bare):  # warm-up: first calls fill caches
                await _round(app, 500, 1)
            best: dict[str, float] = {}
            for _ in range(rounds):
                for name, app in (("routerd", routerd), ("bare", bare)):
                    for concurrency in (1, 64):
                        key = f"{name}_c{concurrency}"
                        us = await _round(app, requests, concurrency)
                        best[key] = min(best.get(key, float("inf")), us)
            await bare_runner.cleanup()
        finally:
            await runner.cleanup()
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    loop = new_loop()
    best = loop.run_until_complete(measure(args.requests, args.rounds))
    loop.close()
    print(f"{'app':<8} {'seq µs':>10} {'c64 µs':>10}")
    for name in ("routerd", "bare"):
        print(f"{name:<8} {best[f'{name}_c1']:>10.1f} {best[f'{name}_c64']:>10.1f}")
    figures = {
        "routerd_us": round(best["routerd_c1"], 1),
        "bare_us": round(best["bare_c1"], 1),
        "added_us": round(best["routerd_c1"] - best["bare_c1"], 1),
        "app_ratio": round(best["routerd_c1"] / best["bare_c1"], 2),
        "c64": {
            "routerd_us": round(best["routerd_c64"], 1),
            "bare_us": round(best["bare_c64"], 1),
            "app_ratio": round(best["routerd_c64"] / best["bare_c64"], 2),
        },
        "requests": args.requests,
        "rounds": args.rounds,
        "python": platform.python_version(),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
