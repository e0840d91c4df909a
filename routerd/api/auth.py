"""Who may call what: the admin API and the OpenAI API's bearer keys.

The admin API can change what runs on the host, so it is served without a token only
on the unix socket ``<state_dir>/routerd.sock`` (mode 0600, so only the service user
and root can connect). Over TCP it needs ``server.admin_token``; with none configured,
admin over TCP is off altogether. The OpenAI API needs one of ``server.api_keys``
over TCP when keys are configured; the socket's peers are trusted as the service
user. Keys are compared in constant time, so response timing says nothing about how
much of a guess was right.
"""

from __future__ import annotations

import hmac
import socket
from collections.abc import Sequence

from aiohttp import web

from routerd.config import ServerConfig
from routerd.errors import Forbidden, Unauthorized

ADMIN_PREFIX = "/admin"
OPENAI_PREFIX = "/v1"


def from_unix_socket(request: web.Request) -> bool:
    """Whether the request came through a unix socket (the admin socket), not TCP."""
    transport = request.transport
    sock = None if transport is None else transport.get_extra_info("socket")
    return sock is not None and getattr(sock, "family", None) == socket.AF_UNIX


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def matches_any(given: str, allowed: Sequence[str]) -> bool:
    """Constant-time membership: every key is compared, whatever matched before."""
    given_bytes = given.encode()
    found = False
    for key in allowed:
        found |= hmac.compare_digest(given_bytes, key.encode())
    return found


def _is_under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def check_access(request: web.Request, server: ServerConfig) -> None:
    """Raise 401/403 unless the request may call its route; called for every request
    with the running config's ``server`` section (its keys and admin token)."""
    path = request.path
    if path.startswith(OPENAI_PREFIX):
        # The common case first: with no API keys configured there is nothing to check.
        if not server.api_keys or not _is_under(path, OPENAI_PREFIX):
            return
        if from_unix_socket(request):
            return
        token = bearer_token(request)
        if token is None:
            raise Unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
            )
        if not matches_any(token, server.api_keys):
            raise Unauthorized("Incorrect API key provided.")
    elif _is_under(path, ADMIN_PREFIX) and not from_unix_socket(request):
        if server.admin_token is None:
            raise Forbidden(
                "the admin API is served only on the unix socket in the state directory; "
                "set server.admin_token to allow it over TCP"
            )
        token = bearer_token(request)
        if token is None or not matches_any(token, (server.admin_token,)):
            raise Unauthorized("a valid admin token is required (Authorization: Bearer …)")
