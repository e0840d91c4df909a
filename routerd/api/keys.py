"""The typed keys under which the HTTP layer finds the daemon's parts on its app."""

from __future__ import annotations

from aiohttp import web

from routerd.services import Services

SERVICES = web.AppKey("services", Services)
"""The running daemon's parts (``routerd.services``); handlers never replace them."""
