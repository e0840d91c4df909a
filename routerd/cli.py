"""``routerd``: the daemon's command line (``routerd serve``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from aiohttp import web

from backends.vllm import use_state_dir as use_vllm_state_dir
from routerd import __version__
from routerd.app import build_app, build_services
from routerd.config import Config, ConfigError, load_config

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config).with_overrides(
            host=args.host,
            port=args.port,
            state_dir=args.state_dir,
            log_level=args.log_level,
            demo=args.demo or None,
        )
    except ConfigError as exc:
        print(f"routerd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return serve(config)


def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; aiohttp drains in-flight requests before cleanup."""
    # vLLM engines keep their caches and sockets in the state dir, not ~/.cache or /tmp.
    use_vllm_state_dir(Path(config.state_dir))
    try:
        services = build_services(config)
    except Exception as exc:
        log.error("cannot start: %s", exc)
        return 1
    app = build_app(services)
    loop = _new_event_loop()
    log.info(
        "routerd %s serving on http://%s:%d (state in %s)",
        __version__,
        config.server.host,
        config.server.port,
        config.state_dir,
    )
    try:
        web.run_app(
            app,
            host=config.server.host,
            port=config.server.port,
            shutdown_timeout=config.server.shutdown_timeout,
            access_log=logging.getLogger("aiohttp.access") if config.log_level == "debug" else None,
            print=None,
            loop=loop,
        )
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", config.server.host, config.server.port, exc)
        return 1
    return 0


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency, but the daemon still runs without it
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":
    sys.exit(main())
