"""``routerctl``: the operator's command line. It talks only to the admin HTTP API.

By default it connects to the admin unix socket ``<state_dir>/routerd.sock`` (the
state dir from ``--state-dir``, else ``$ROUTERD_STATE_DIR``, else routerd's default),
which needs no token: only routerd's own user (and root) can open it. ``--url`` (or
``$ROUTERD_URL``) talks over TCP instead, sending ``$ROUTERD_ADMIN_TOKEN`` as a bearer
token — routerd refuses admin over TCP without one. Every command takes ``--json``:
without it, it prints for people; with it, the API's JSON as is, for scripts. Any
failure prints one line on stderr and exits non-zero. Only the standard library is
used, so the command starts fast and works from a bare Python.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from routerd.completion import completion_script
from routerd.ctl_display import format_ps, load_progress
from routerd.units import human_bytes

DEFAULT_URL = "http://127.0.0.1:8400"
SOCKET_NAME = "routerd.sock"  # routerd.config.SOCKET_NAME; not imported, to start fast


class CtlError(Exception):
    """One line for the operator."""


@dataclass(frozen=True)
class Target:
    """Where routerd's admin API is: a unix socket, or a URL with an optional token."""

    socket_path: Path | None = None
    url: str | None = None
    token: str | None = None

    def describe(self) -> str:
        return f"unix socket {self.socket_path}" if self.socket_path else str(self.url)

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        if self.socket_path is not None:
            return _UnixConnection(self.socket_path, timeout)
        parts = urllib.parse.urlsplit(self.url or DEFAULT_URL)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CtlError(f"--url must look like http://HOST:PORT, got {self.url!r}")
        if parts.scheme == "https":
            return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout)
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)

    def base_path(self) -> str:
        if self.socket_path is not None:
            return ""
        return urllib.parse.urlsplit(self.url or DEFAULT_URL).path.rstrip("/")


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (``http.client`` speaks only TCP by itself)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._socket_path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def request(
    target: Target | str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    timeout: float = 900.0,
) -> Any:
    """Call the admin API; ``target`` may be a plain URL (TCP, no token)."""
    if isinstance(target, str):
        target = Target(url=target)
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    where = target.describe()
    try:
        conn = target.connect(timeout)
        try:
            conn.request(method, target.base_path() + path, body=data, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
    except PermissionError:
        raise CtlError(
            f"permission denied on {where}: run routerctl as routerd's user (or root)"
        ) from None
    except FileNotFoundError:
        raise CtlError(
            f"cannot reach routerd at {where}: no such socket (is routerd running with this "
            "state dir? set --state-dir or ROUTERD_STATE_DIR, or use --url)"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise CtlError(f"cannot reach routerd at {where}: {exc}") from None
    if response.status >= 400:
        raise CtlError(_error_message(payload, response.status, response.reason))
    try:
        return json.loads(payload or b"null")
    except json.JSONDecodeError:
        raise CtlError(f"routerd at {where} answered with something that is not JSON") from None


def _error_message(payload: bytes, status: int, reason: str) -> str:
    try:
        message = json.loads(payload)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = reason
    return f"{message} (HTTP {status})"


def default_state_dir() -> Path:
    """routerd's own default (``routerd.config.default_state_dir``), without importing it."""
    if os.environ.get("ROUTERD_STATE_DIR"):
        return Path(os.environ["ROUTERD_STATE_DIR"]).expanduser()
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path("~").expanduser() / ".local" / "state")
    return Path(xdg).expanduser() / "routerd"


def resolve_target(url: str | None, state_dir: str | None) -> Target:
    """``--url`` (TCP), else ``--state-dir`` (socket), else ``$ROUTERD_URL``, else the
    socket in the default state dir."""
    token = os.environ.get("ROUTERD_ADMIN_TOKEN") or None
    if url:
        return Target(url=url, token=token)
    if state_dir:
        return Target(socket_path=Path(state_dir).expanduser() / SOCKET_NAME)
    if os.environ.get("ROUTERD_URL"):
        return Target(url=os.environ["ROUTERD_URL"], token=token)
    return Target(socket_path=default_state_dir() / SOCKET_NAME)


# -- formatting for people --------------------------------------------------------


def human_age(timestamp: float, now: float | None = None) -> str:
    seconds = max(0.0, (now or time.time()) - timestamp)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def human_until(timestamp: float, now: float | None = None) -> str:
    seconds = max(0.0, timestamp - (now or time.time()))
    if seconds < 60:
        return f"in {seconds:.0f}s"
    if seconds < 3600:
        return f"in {seconds / 60:.0f}m"
    return f"in {seconds / 3600:.1f}h"


def human_duration(seconds: float) -> str:
    """``850 ms``, ``12.3 s``, ``4m 10s``, ``2h 5m``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60)}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60)}m"


def _bytes_or_dash(n: int | None) -> str:
    return "-" if n is None else human_bytes(n)


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _format_status(status: dict[str, Any]) -> str:
    devices = table(
        ["DEVICE", "TOTAL", "USED", "RESERVED", "ROUTERD"],
        [
            [
                d["id"],
                human_bytes(d["total_bytes"]),
                human_bytes(d["used_bytes"]),
                human_bytes(d["reserved_bytes"]),
                human_bytes(d.get("routerd_bytes", 0)),
            ]
            for d in status["devices"]
        ],
    )
    instances = status["instances"]
    from routerd import ctl_traffic

    traffic = ctl_traffic.format_traffic(status.get("traffic") or [])
    text = devices + "\n\n" + (_format_instances(instances) if instances else "no models loaded")
    return text + _format_failed(status.get("failed") or []) + traffic


def _format_failed(failed: Sequence[dict[str, Any]]) -> str:
    """Versions whose instance failed (restarted on their next request), if any."""
    if not failed:
        return ""
    return "\n\nfailed instances (loaded again on the next request):\n" + table(
        ["MODEL", "DEVICE", "WHEN", "TIMES", "REASON"],
        [
            [
                f"{f['model']}@{f['version']}",
                f["device"],
                human_age(f["at"]),
                str(f["times"]),
                _clip(f["reason"]),
            ]
            for f in failed
        ],
    )


def _format_instances(instances: Sequence[dict[str, Any]]) -> str:
    """One row per instance. ESTIMATED (before the load) and EXPIRES (keep-alive) only
    when the daemon reports them; SIZE is the measured footprint ("-" until measured)."""
    estimated = any("estimated_bytes" in i for i in instances)
    expiring = any(i.get("expires_at") is not None for i in instances)
    headers = ["MODEL", "DEVICE", "STATE", *(["ESTIMATED"] if estimated else []), "SIZE"]
    headers += ["IN FLIGHT", "LAST USED", *(["EXPIRES"] if expiring else [])]
    rows = []
    for i in instances:
        row = [
            f"{i['model']}@{i['version']}",
            i["device"],
            i["state"] + (", pinned" if i.get("pinned") else ""),
        ]
        if estimated:
            row.append(_bytes_or_dash(i.get("estimated_bytes") or None))
        row += [_bytes_or_dash(_measured(i)), str(i["in_flight"]), human_age(i["last_used"])]
        if expiring:
            expires_at = i.get("expires_at")
            row.append("-" if expires_at is None else human_until(expires_at))
        rows.append(row)
    return table(headers, rows)


def _measured(instance: dict[str, Any]) -> int | None:
    """The measured footprint; daemons that predate ``measured_bytes`` report ``bytes``."""
    if "measured_bytes" in instance:
        measured: int | None = instance["measured_bytes"]
        return measured
    return int(instance["bytes"])


def _format_models(models: Sequence[dict[str, Any]]) -> str:
    if not models:
        return "no models registered"
    return table(
        ["MODEL", "BACKEND", "STATE", "PINNED", "SOURCE", "PATH"],
        [
            [
                m["id"],
                m["backend"],
                m["state"],
                "yes" if m.get("pinned") else "no",
                m["source"],
                m["path"],
            ]
            for m in models
        ],
    )


def _format_events(events: Sequence[dict[str, Any]]) -> str:
    if not events:
        return "no events"
    return table(
        ["TIME", "KIND", "MODEL", "DEVICE", "REASON", "BYTES", "FOR"],
        [
            [
                human_age(e["ts"]),
                e["kind"],
                f"{e['model']}@{e['version']}",
                e.get("device") or "-",
                _clip(e.get("reason") or "-"),
                _bytes_or_dash(_event_bytes(e)),
                e.get("trigger") or "-",
            ]
            for e in events
        ],
    )


def _event_bytes(event: dict[str, Any]) -> int | None:
    """``bytes``; events recorded before it existed kept it in ``detail``."""
    value = event.get("bytes")
    if value is None:
        value = (event.get("detail") or {}).get("bytes")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- commands ---------------------------------------------------------------------


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
    if args.command in ("route", "rollout"):
        from routerd import ctl_traffic

        return ctl_traffic.run(args)
    if args.command == "status":
        result = request(url, "GET", "/admin/status")
        return json.dumps(result, indent=2) if as_json else _format_status(result)
    if args.command == "models":
        result = request(url, "GET", "/admin/models")
        return json.dumps(result, indent=2) if as_json else _format_models(result["models"])
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
        return completion_script(args.shell, _parser())
    if args.command == "load":
        body = {"model": args.model}
        if args.device is not None:
            body["device"] = args.device
        if as_json:
            return json.dumps(request(url, "POST", "/admin/load", body), indent=2)
        result = load_with_progress(url, body, sys.stderr)
        took = f" in {human_duration(result['load_ms'] / 1000)}" if result.get("load_ms") else ""
        return (
            f"loaded {result['model']}@{result['version']} on {result['device']} "
            f"({human_bytes(result['bytes'])}){took}"
        )
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
        return json.dumps(result, indent=2) if as_json else _format_events(result["events"])
    if args.command == "why":
        path = "/admin/why/" + urllib.parse.quote(args.model, safe="@:")
        result = request(url, "GET", path)
        return json.dumps(result, indent=2) if as_json else str(result["explanation"])
    raise CtlError(f"unknown command {args.command}")


def _parser() -> argparse.ArgumentParser:
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
    from routerd import ctl_traffic

    ctl_traffic.add_commands(commands, common)
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
    args = _parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    try:
        args.target = resolve_target(getattr(args, "url", None), getattr(args, "state_dir", None))
        print(run(args))
    except CtlError as exc:
        print(f"routerctl: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
