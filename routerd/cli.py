"""``routerd``: the daemon's command line (``routerd serve``, ``routerd simulate``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from backends.host_memory import map_large_allocations
from backends.vllm import use_state_dir as use_vllm_state_dir
from routerd import __version__, logs, systemd
from routerd.admin_socket import bind_admin_socket, remove_admin_socket, socket_inode
from routerd.api.keys import SERVICES
from routerd.app import build_app, build_services
from routerd.config import LOG_FORMATS, Config, ConfigError, default_state_dir, load_config
from routerd.devices import HostMemoryTooSmall, cpu_budget_beside_tier
from routerd.reload import ConfigLoader, reload_config
from routerd.simulate import command as simulate_command

log = logging.getLogger("routerd")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="routerd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"routerd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", type=Path, help="TOML config file (default: embedded defaults)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8400)")
    serve.add_argument("--state-dir", type=Path, help="where the database and demo models live")
    serve.add_argument(
        "--demo", action="store_true", help="create and register the demo models (nonsense text)"
    )
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="default info"
    )
    serve.add_argument(
        "--log-format", choices=LOG_FORMATS, help="text (key=value, the default) or json"
    )
    simulate_command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "simulate":
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return simulate_command.run(args)

    def load() -> Config:
        """The file (read again on each reload) with the flags over it."""
        return load_config(args.config).with_overrides(
            host=args.host,
            port=args.port,
            state_dir=args.state_dir,
            log_level=args.log_level,
            log_format=args.log_format,
            demo=args.demo or None,
        )

    try:
        config = load()
        cpu_budget_beside_tier(config.devices.cpu_memory, config.devices.host_cache)
    except (ConfigError, HostMemoryTooSmall) as exc:
        print(f"routerd: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level, config.log_format)
    return serve(config, load)


def serve(config: Config, load: ConfigLoader | None = None) -> int:
    """Run until SIGTERM/SIGINT (SIGHUP reloads with ``load``); in-flight requests finish."""
    # vLLM engines keep their caches and sockets in the state dir, not ~/.cache or /tmp.
    use_vllm_state_dir(Path(config.state_dir))
    exact = config.devices.cpu_memory != 0 and config.devices.cpu_allocation == "exact"
    if exact and not map_large_allocations():
        log.warning("devices.cpu_allocation = exact needs glibc; keeping the C library's")
    try:
        services = build_services(config)
    except Exception as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        admin_sock = bind_admin_socket(config.socket_path)
    except OSError as exc:
        services.store.close()
        log.error("cannot start: %s", exc)
        return 1
    inode = socket_inode(config.socket_path)
    app = build_app(services)
    loop = _new_event_loop()
    try:
        return loop.run_until_complete(_run(app, config, load, admin_sock))
    finally:
        remove_admin_socket(config.socket_path, inode)
        loop.close()


async def _run(
    app: web.Application, config: Config, load: ConfigLoader | None, admin_sock: socket.socket
) -> int:
    """Serve; tell systemd READY=1 once listening, STOPPING=1 when the drain begins."""
    access_log = logging.getLogger("aiohttp.access") if config.log_level == "debug" else None
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=config.server.shutdown_timeout,
        access_log=access_log,
    )  # fmt: skip
    await runner.setup()
    try:
        await web.TCPSite(runner, config.server.host, config.server.port).start()
        await web.SockSite(runner, admin_sock).start()
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", config.server.host, config.server.port, exc)
        await runner.cleanup()
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if load is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: _reload(app, load))
    interval = systemd.watchdog_interval()
    pinger = asyncio.create_task(systemd.watchdog(interval)) if interval else None
    where = f"http://{config.server.host}:{config.server.port}"
    log.info(
        "routerd %s serving on %s, admin on %s (state in %s)",
        __version__,
        where,
        config.socket_path,
        config.state_dir,
    )
    for line in startup_lines(config, sorted(app[SERVICES].router.table.latest)):
        log.info("%s", line)
    _warn_if_exposed(config)
    # Everything alive now (modules, config, routes) lives as long as the daemon: keep
    # it out of the collector's full passes, which would otherwise walk it again and
    # again while requests wait (the startup heap is large once torch is imported).
    gc.freeze()
    systemd.notify(f"READY=1\nSTATUS=serving on {where}")
    await stop.wait()
    systemd.notify("STOPPING=1\nSTATUS=draining")
    try:
        await runner.cleanup()  # stop accepting, let requests finish, unload, close
    finally:
        if pinger is not None:  # pinged through the drain, which may outlast WatchdogSec
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger
    return 0


def _reload(app: web.Application, load: ConfigLoader) -> None:
    systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        reload_config(app[SERVICES], load)
    finally:
        systemd.notify("READY=1")


def startup_lines(config: Config, names: Sequence[str]) -> list[str]:
    """What a first-time user needs once the daemon listens: its models, what to try, what next.

    Without these the console shows only where routerd serves, and a new user has to
    find the model names and the API's paths in the README before sending anything.
    The completion example names a generating model: names with ``embed`` in them are
    skipped when another is served, since an embedding model refuses chat.
    """
    url = f"http://{_reachable_host(config.server.host)}:{config.server.port}"
    auth = " -H 'Authorization: Bearer KEY'" if config.server.api_keys else ""
    if not names:
        return [
            "no models registered yet: routerctl register NAME --path FOLDER "
            "(or restart with --demo for the demo models)",
            f"try: curl -s{auth} {url}/v1/models",
        ]
    chat = next((n for n in names if "embed" not in n), names[0])
    body = json.dumps(
        {"model": chat, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    )
    state_dir = (
        "" if config.state_dir == default_state_dir() else f" --state-dir {config.state_dir}"
    )
    return [
        f"models: {', '.join(names)}",
        f"try: curl -s{auth} {url}/v1/models",
        f"try: curl -s{auth} {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{body}'",
        f"next: routerctl{state_dir} status (in .venv/bin/ after make run)",
    ]


def _reachable_host(host: str) -> str:
    """The address a local curl reaches ``host`` by: wildcards mean this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _warn_if_exposed(config: Config) -> None:
    """Binding beyond loopback is allowed when asked for; say what guards it."""
    if config.server.host in ("127.0.0.1", "::1", "localhost"):
        return
    if not config.server.api_keys:
        log.warning(
            "serving on %s with no server.api_keys: anyone who can reach it may use the models",
            config.server.host,
        )
    if config.server.admin_token is None:
        log.info("admin API over TCP is off (no server.admin_token); use the unix socket")


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency, but the daemon still runs without it
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":
    sys.exit(main())
