"""routerctl's command line: the argument parser, one function per command, ``main``.

Each command is one admin API call (``load`` also polls ``/admin/status`` to draw its
progress). Without ``--json`` the answer goes through ``routerd.ctl.display`` (or
``routerd.ctl.traffic`` for ``route`` and ``rollout``); with it, the API's JSON is
printed as is, for scripts. Any failure prints one line on stderr and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from routerd.completion import completion_script
from routerd.ctl import traffic
from routerd.ctl.client import CtlError, Target, request, resolve_target
from routerd.ctl.display import (
    format_events,
    format_models,
    format_ps,
    format_status,
    format_usage,
    load_progress,
)
from routerd.ctl.formatting import human_duration
from routerd.units import human_bytes


def load_with_progress(url: Target | str, body: dict[str, Any], out: TextIO) -> Any:
    """POST /admin/load (which answers once ready), drawing progress on ``out`` meanwhile.

    The progress is read from ``/admin/status`` a few times a second. On a terminal the
    line is redrawn in place; elsewhere each new phase gets a line of its own.
    """
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["result"] = request(url, "POST", "/admin/load", body)
        except CtlError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=call, name="routerctl load", daemon=True)
    worker.start()
    tty = out.isatty()
    shown, phase = "", ""
    while worker.is_alive():
        worker.join(0.2)
        if not worker.is_alive():
            break
        try:
            status = request(url, "GET", "/admin/status", timeout=5)
        except CtlError:
            continue
        found = load_progress(status.get("instances", []), body["model"])
        if found is None or found[1] == shown:
            continue
        if tty:
            out.write("\r\033[K" + found[1])
        elif found[0] != phase:  # a log, not a screen: one line per phase
            out.write(found[1] + "\n")
        out.flush()
        phase, shown = found
    if tty and shown:
        out.write("\r\033[K")
        out.flush()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _loaded_line(result: dict[str, Any], device: str | None) -> str:
    """What ``routerctl load`` prints: the load and its time, or that there was none.

    A version that was ready already keeps its earlier load's ``load_ms``; printing
    that as "loaded … in" would claim a load that never happened (nor on ``device``).
    """
    name, placed = f"{result['model']}@{result['version']}", str(result["device"])
    size = human_bytes(result["bytes"])
    if result.get("already_loaded"):
        elsewhere = device is not None and placed != device
        if device == "cuda" and placed.startswith("cuda:"):
            elsewhere = False  # any GPU was asked for
        hint = f"; to move it to {device}, evict it first" if elsewhere else ""
        return f"{name} was already loaded on {placed} ({size}); nothing to load{hint}"
    took = f" in {human_duration(result['load_ms'] / 1000)}" if result.get("load_ms") else ""
    return f"loaded {name} on {placed} ({size}){took}"


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CtlError(f"--option expects key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run(args: argparse.Namespace) -> str:
    """Execute one command; return what to print."""
    url = args.target
    as_json = args.json
    if args.command in traffic.COMMANDS:
        return traffic.run(args)
    if args.command == "status":
        result = request(url, "GET", "/admin/status")
        return json.dumps(result, indent=2) if as_json else format_status(result)
    if args.command == "models":
        result = request(url, "GET", "/admin/models")
        return json.dumps(result, indent=2) if as_json else format_models(result["models"])
    if args.command == "register":
        body = {
            "name": args.name,
            "version": args.version,
            "backend": args.backend,
            "path": str(Path(args.path).expanduser().resolve()),
            "options": dict(_parse_option(o) for o in args.option),
        }
        result = request(url, "POST", "/admin/models", body)
        return json.dumps(result, indent=2) if as_json else f"registered {result['id']}"
    if args.command == "ps":
        result = request(url, "GET", "/admin/status")
        return json.dumps(result["instances"], indent=2) if as_json else format_ps(result)
    if args.command == "completion":
        return completion_script(args.shell, build_parser())
    if args.command == "load":
        body = {"model": args.model}
        if args.device is not None:
            body["device"] = args.device
        if args.reprofile:
            body["reprofile"] = True
        if as_json:
            return json.dumps(request(url, "POST", "/admin/load", body), indent=2)
        return _loaded_line(load_with_progress(url, body, sys.stderr), args.device)
    if args.command == "evict":
        body = {"model": args.model, **({"force": True} if args.force else {})}
        result = request(url, "POST", "/admin/evict", body)
        if as_json:
            return json.dumps(result, indent=2)
        return "\n".join(
            f"evicted {i['model']}@{i['version']} from {i['device']} ({human_bytes(i['bytes'])})"
            for i in result["evicted"]
        )
    if args.command in ("pin", "unpin"):
        result = request(url, "POST", f"/admin/{args.command}", {"model": args.model})
        if as_json:
            return json.dumps(result, indent=2)
        return f"{args.command}ned {result['id']}"
    if args.command == "events":
        query = {"limit": str(args.limit)}
        if args.model is not None:
            query["model"] = args.model
        result = request(url, "GET", "/admin/events?" + urllib.parse.urlencode(query))
        return json.dumps(result, indent=2) if as_json else format_events(result["events"])
    if args.command == "usage":
        since = "" if args.since == "all" else "?" + urllib.parse.urlencode({"since": args.since})
        result = request(url, "GET", "/admin/requests/usage" + since)
        return json.dumps(result, indent=2) if as_json else format_usage(result, args.since)
    if args.command == "why":
        path = "/admin/why/" + urllib.parse.quote(args.model, safe="@:")
        result = request(url, "GET", path)
        return json.dumps(result, indent=2) if as_json else str(result["explanation"])
    raise CtlError(f"unknown command {args.command}")


def build_parser() -> argparse.ArgumentParser:
    common = _OneLineErrors(add_help=False)
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="talk over TCP to this address, e.g. http://127.0.0.1:8400 (default: the unix "
        "socket, or $ROUTERD_URL); sends $ROUTERD_ADMIN_TOKEN",
    )
    common.add_argument(
        "--state-dir",
        default=argparse.SUPPRESS,
        help="routerd's state dir, where its admin socket is (default $ROUTERD_STATE_DIR)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print machine-readable JSON"
    )
    parser = _OneLineErrors(
        prog="routerctl", parents=[common], description="Operate a running routerd."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", parents=[common], help="devices and loaded instances")
    commands.add_parser("models", parents=[common], help="registered model versions")
    commands.add_parser(
        "ps", parents=[common], help="loaded models: size, device, state, requests, until when"
    )
    completion = commands.add_parser(
        "completion",
        parents=[common],
        help="print a shell completion script: source <(routerctl completion bash)",
    )
    completion.add_argument("shell", choices=["bash", "zsh"])
    register = commands.add_parser("register", parents=[common], help="register a model version")
    register.add_argument("name")
    register.add_argument("--version", default="1")
    register.add_argument("--path", required=True, help="Hugging Face model folder")
    register.add_argument("--backend", default="transformers")
    register.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend or scheduler option, e.g. dtype=float32 device=cpu",
    )
    load = commands.add_parser("load", parents=[common], help="load and warm up a model")
    load.add_argument("model", metavar="NAME[@VERSION]")
    load.add_argument("--device", help="cpu, cuda or cuda:N (default: where placement puts it)")
    load.add_argument(
        "--reprofile",
        action="store_true",
        help="measure the footprint anew instead of trusting the stored one (evict it first)",
    )
    evict = commands.add_parser("evict", parents=[common], help="drain and unload a model")
    evict.add_argument("model", metavar="NAME[@VERSION]")
    evict.add_argument(
        "--force",
        action="store_true",
        help="do not wait for requests in flight: they end at once with an error",
    )
    for name, text in (
        ("pin", "keep a model version resident: never evicted to make room"),
        ("unpin", "let a pinned model version be evicted again"),
        ("why", "explain a model version's latest load or eviction"),
    ):
        sub = commands.add_parser(name, parents=[common], help=text)
        sub.add_argument("model", metavar="NAME[@VERSION]")
    events = commands.add_parser(
        "events", parents=[common], help="recent loads, evictions and failures, newest first"
    )
    events.add_argument("--model", metavar="NAME[@VERSION]", help="only this model's events")
    events.add_argument("--limit", type=_positive_int, default=50, help="how many (default 50)")
    usage = commands.add_parser(
        "usage",
        parents=[common],
        help="requests, errors, tokens and cold starts per model version, from the request log",
    )
    usage.add_argument(
        "--since", default="24h", help='this far back, e.g. 1h, 7d, or "all" kept (default 24h)'
    )
    traffic.add_commands(commands, common)
    return parser


class _OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes print one line (not the usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    try:
        args.target = resolve_target(getattr(args, "url", None), getattr(args, "state_dir", None))
        print(run(args))
    except CtlError as exc:
        print(f"routerctl: {exc}", file=sys.stderr)
        return 1
    return 0
