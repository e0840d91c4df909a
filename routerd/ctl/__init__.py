"""``routerctl``: the operator's command line. It talks only to the admin HTTP API.

Every command takes ``--json``: without it, it prints for people; with it, the API's
JSON as is, for scripts. Any failure prints one line on stderr and exits non-zero.
Only the standard library is used (no torch, aiohttp or backends), so the command
starts fast and works from a bare Python.

The modules, each importing only those listed before it:

- ``client``: where routerd is (``Target``, ``resolve_target``) and ``request``, which
  turns every failure into a one-line ``CtlError``;
- ``formatting``: times, durations and plain tables shared by every view;
- ``display``: ``status``, ``ps``, ``models``, ``events``, ``usage`` and load progress
  for people;
- ``traffic``: the ``route`` and ``rollout`` commands, parser and output;
- ``commands``: the parser, the other commands, and ``main`` (the ``routerctl`` script).
"""

from routerd.ctl.client import CtlError, Target, request, resolve_target
from routerd.ctl.commands import build_parser, load_with_progress, main
from routerd.ctl.display import format_instances, format_ps, load_progress
from routerd.ctl.formatting import human_duration
from routerd.units import human_bytes

__all__ = [
    "CtlError",
    "Target",
    "build_parser",
    "format_instances",
    "format_ps",
    "human_bytes",
    "human_duration",
    "load_progress",
    "load_with_progress",
    "main",
    "request",
    "resolve_target",
]
