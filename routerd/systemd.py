"""The systemd notify protocol (sd_notify), spoken directly: one datagram per message.

With ``Type=notify`` systemd sets ``$NOTIFY_SOCKET`` and waits for ``READY=1``
before it calls the service started; ``STOPPING=1`` says shutdown began; with
``WatchdogSec=`` it sets ``$WATCHDOG_USEC`` and restarts the service unless
``WATCHDOG=1`` arrives in time. Sending it from a task on the event loop means a
loop that is stuck stops sending, and systemd restarts the daemon. Outside systemd
(no ``$NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("routerd")


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd; False when not under systemd."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket: its name starts with a NUL byte
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", env.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WatchdogSec``, or None if unset.

    ``$WATCHDOG_PID``, when set, must be this process (else the watchdog is another's).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        seconds = int(usec) / 1_000_000
    except ValueError:
        return None
    return seconds / 2 if seconds > 0 else None


async def watchdog(interval: float) -> None:
    """Ping systemd's watchdog from the event loop every ``interval`` seconds, forever."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
