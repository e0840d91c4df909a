"""routerctl's client for the admin HTTP API: where routerd is, and one call to it.

By default it connects to the admin unix socket ``<state_dir>/routerd.sock`` (the
state dir from ``--state-dir``, else ``$ROUTERD_STATE_DIR``, else routerd's default),
which needs no token: only routerd's own user (and root) can open it. ``--url`` (or
``$ROUTERD_URL``) talks over TCP instead, sending ``$ROUTERD_ADMIN_TOKEN`` as a bearer
token — routerd refuses admin over TCP without one. Every failure becomes a
``CtlError`` whose text is the one line the operator sees.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
