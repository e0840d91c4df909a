"""The admin unix socket, ``<state_dir>/routerd.sock``: how ``routerctl`` reaches routerd.

The socket file is created with mode 0600 (the umask is narrowed while it is bound,
so it never exists with wider permissions), owned by the user routerd runs as: only
that user and root can connect, which is what makes it safe to serve the admin API
there without a token. A socket file left behind by a routerd that was killed is
replaced; one that another routerd still answers on is not.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

MAX_PATH_BYTES = 107  # sun_path is 108 bytes with its terminating NUL on Linux


class AdminSocketError(OSError):
    """The socket cannot be created; the message says why and what to do."""


def bind_admin_socket(path: Path) -> socket.socket:
    """A listening-ready unix socket at ``path`` (mode 0600); the caller serves on it."""
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise AdminSocketError(
            f"admin socket path {path} is longer than {MAX_PATH_BYTES} bytes; "
            "use a shorter state dir"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise AdminSocketError(f"cannot create admin socket {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return sock


def _remove_stale(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AdminSocketError(f"{path} exists and is not a socket; move it aside")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody answers: left behind by a routerd that died
        return
    finally:
        probe.close()
    raise AdminSocketError(f"another routerd is serving on {path}; stop it first")


def socket_inode(path: Path) -> int:
    return path.lstat().st_ino


def remove_admin_socket(path: Path, inode: int) -> None:
    """Remove the socket file at shutdown if it is still ours (``inode`` after binding)."""
    with contextlib.suppress(OSError):
        if path.lstat().st_ino == inode:
            path.unlink()
