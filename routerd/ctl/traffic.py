"""``routerctl route`` and ``routerctl rollout``: traffic commands over the admin API.

Kept apart from ``routerd.ctl.commands`` (which registers them) so that module stays
about models and memory. Same rules: standard library only, ``--json`` prints the
API's JSON as is, failures are one line on stderr.

    routerctl route [show] [NAME]
    routerctl route set NAME 1=90 2=10
    routerctl route clear NAME
    routerctl route shadow NAME 3 --percent 20
    routerctl route shadow NAME --off
    routerctl route history NAME
    routerctl rollout NAME --to 2 --steps 5,25,50,100 --interval 60s \\
        --max-error-rate 1% --max-p95-ratio 1.5
    routerctl rollout status [NAME] | pause NAME | resume NAME | abort NAME
"""

from __future__ import annotations

import argparse
import json
import re
import urllib.parse
from typing import Any

from routerd.ctl.client import CtlError, request
from routerd.ctl.formatting import human_age, table

COMMANDS = ("route", "rollout")
ROLLOUT_ACTIONS = ("status", "pause", "resume", "abort")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add ``route`` and ``rollout`` to routerctl's subcommands."""
    route = commands.add_parser("route", parents=[common], help="show or change a model's route")
    actions = route.add_subparsers(dest="route_action")
    show = actions.add_parser("show", parents=[common], help="routes (of NAME, or all)")
    show.add_argument("name", nargs="?", metavar="NAME")
    set_ = actions.add_parser(
        "set", parents=[common], help="split NAME's traffic by weight: 1=90 2=10"
    )
    set_.add_argument("name", metavar="NAME")
    set_.add_argument("weights", nargs="+", metavar="VERSION=WEIGHT")
    clear = actions.add_parser(
        "clear", parents=[common], help="drop NAME's weights: serve its newest version"
    )
    clear.add_argument("name", metavar="NAME")
    shadow = actions.add_parser(
        "shadow", parents=[common], help="mirror a share of NAME's requests to VERSION"
    )
    shadow.add_argument("name", metavar="NAME")
    shadow.add_argument("version", nargs="?", metavar="VERSION")
    shadow.add_argument("--percent", type=float, default=100.0, help="share mirrored (100)")
    shadow.add_argument("--off", action="store_true", help="stop mirroring")
    history = actions.add_parser("history", parents=[common], help="NAME's route changes")
    history.add_argument("name", metavar="NAME")

    rollout = commands.add_parser(
        "rollout",
        parents=[common],
        help="canary NAME to a version, or: status|pause|resume|abort NAME",
    )
    rollout.add_argument("words", nargs="+", metavar="NAME | ACTION NAME")
    rollout.add_argument("--to", metavar="VERSION", help="the version to roll out")
    rollout.add_argument(
        "--steps", default="5,25,50,100", help="candidate percent per step (5,25,50,100)"
    )
    rollout.add_argument("--interval", default="60s", help="least time per step (60s)")
    rollout.add_argument(
        "--max-error-rate", default="1%", help="roll back above this error rate (1%%)"
    )
    rollout.add_argument(
        "--max-p95-ratio", type=float, default=1.5, help="roll back above this p95 ratio (1.5)"
    )
    rollout.add_argument(
        "--min-requests", type=int, default=20, help="requests needed to judge a step (20)"
    )


def run(args: argparse.Namespace) -> str:
    if args.command == "route":
        return _route(args)
    return _rollout(args)


# -- route -----------------------------------------------------------------------------


def _route(args: argparse.Namespace) -> str:
    url, as_json = args.target, args.json
    action = args.route_action or "show"
    if action == "show":
        name = getattr(args, "name", None)
        if name is None:
            result = request(url, "GET", "/admin/routes")
            if as_json:
                return json.dumps(result, indent=2)
            return "\n\n".join(_format_route(r) for r in result["routes"]) or "no models"
        result = request(url, "GET", _path(name))
        return json.dumps(result, indent=2) if as_json else _format_route(result)
    if action == "set":
        weights = dict(_parse_weight(w) for w in args.weights)
        result = request(url, "PUT", _path(args.name), {"weights": weights})
        return json.dumps(result, indent=2) if as_json else _format_route(result)
    if action == "clear":
        result = request(url, "DELETE", _path(args.name))
        return json.dumps(result, indent=2) if as_json else _format_route(result)
    if action == "shadow":
        if args.off:
            result = request(url, "DELETE", _path(args.name) + "/shadow")
        else:
            if args.version is None:
                raise CtlError("route shadow needs a VERSION (or --off)")
            body = {"version": args.version, "percent": args.percent}
            result = request(url, "PUT", _path(args.name) + "/shadow", body)
        return json.dumps(result, indent=2) if as_json else _format_route(result)
    if action == "history":
        result = request(url, "GET", _path(args.name))
        if as_json:
            return json.dumps(result["history"], indent=2)
        return _format_history(result["history"])
    raise CtlError(f"unknown route action {action}")


def _path(name: str) -> str:
    return "/admin/routes/" + urllib.parse.quote(name, safe=":")


def _parse_weight(text: str) -> tuple[str, int]:
    version, sep, weight = text.partition("=")
    if not sep or not version:
        raise CtlError(f"weights are VERSION=WEIGHT, got {text!r}")
    try:
        return version, int(weight)
    except ValueError:
        raise CtlError(f"weight of version {version} must be an integer, got {weight!r}") from None


def _format_route(route: dict[str, Any]) -> str:
    kind = "weights" if route["explicit"] else "no route: newest version"
    head = f"{route['name']} ({kind}), primary {route['primary']}"
    rows = [
        [
            v["version"],
            "-" if v["weight"] is None else str(v["weight"]),
            f"{v['share']:g}%",
            v["state"],
            v["instance"],
        ]
        for v in route["versions"]
    ]
    text = head + "\n" + table(["VERSION", "WEIGHT", "SHARE", "STATE", "INSTANCE"], rows)
    shadow = route.get("shadow")
    if shadow:
        text += f"\nshadow: version {shadow['version']} gets a copy of {shadow['percent']:g}%"
    return text


def _format_history(history: list[dict[str, Any]]) -> str:
    if not history:
        return "no route changes"
    return table(
        ["TIME", "WEIGHTS", "SHADOW", "REASON"],
        [
            [
                human_age(h["ts"]),
                " ".join(f"{v}={w}" for v, w in h["weights"].items()) or "-",
                "-" if not h["shadow"] else f"{h['shadow']['version']} {h['shadow']['percent']:g}%",
                h["reason"],
            ]
            for h in history
        ],
    )


# -- rollout ---------------------------------------------------------------------------


def _rollout(args: argparse.Namespace) -> str:
    url, as_json = args.target, args.json
    words = args.words
    if words[0] in ROLLOUT_ACTIONS and (len(words) == 2 or words == ["status"]):
        if len(words) == 1:
            result = request(url, "GET", "/admin/rollouts")
            return json.dumps(result, indent=2) if as_json else _format_rollouts(result)
        action, name = words
        path = "/admin/rollouts/" + urllib.parse.quote(name, safe=":")
        if action == "status":
            result = request(url, "GET", path)
        else:
            result = request(url, "POST", f"{path}/{action}", {})
        return json.dumps(result, indent=2) if as_json else _format_rollout(result)
    if len(words) != 1:
        raise CtlError(
            "usage: routerctl rollout NAME --to VERSION [...] | "
            "rollout status|pause|resume|abort NAME"
        )
    if not args.to:
        raise CtlError("rollout NAME needs --to VERSION")
    body = {
        "model": words[0],
        "to": args.to,
        "steps": _parse_steps(args.steps),
        "interval_s": parse_duration(args.interval),
        "max_error_rate": parse_rate(args.max_error_rate),
        "max_p95_ratio": args.max_p95_ratio,
        "min_requests": args.min_requests,
    }
    result = request(url, "POST", "/admin/rollouts", body)
    return json.dumps(result, indent=2) if as_json else _format_rollout(result)


def _parse_steps(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CtlError(f"--steps are integer percentages like 5,25,50,100; got {text!r}") from None


def parse_duration(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise CtlError(f"durations look like 250ms, 30s, 5m, 1h; got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_rate(text: str) -> float:
    """``1%`` → 0.01; a bare number is a fraction (0.01)."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise CtlError(f"a rate is a percentage (1%) or a fraction (0.01); got {text!r}") from None
    if not 0 <= value <= 1:
        raise CtlError(f"a rate must be from 0% to 100%; got {text!r}")
    return value


def _format_rollouts(result: dict[str, Any]) -> str:
    rollouts = result["rollouts"]
    if not rollouts:
        return "no rollouts"
    return table(
        ["ID", "MODEL", "FROM", "TO", "STATUS", "STEP", "WEIGHT", "REASON"],
        [
            [
                str(r["id"]),
                r["name"],
                r["from"],
                r["to"],
                r["status"],
                f"{r['step']}/{len(r['steps'])}",
                f"{r['weight']}%",
                r.get("reason") or "-",
            ]
            for r in rollouts
        ],
    )


def _format_rollout(r: dict[str, Any]) -> str:
    lines = [
        f"rollout {r['id']} of {r['name']}: {r['from']} -> {r['to']}, {r['status']}, "
        f"step {r['step']} of {len(r['steps'])} ({r['weight']}% to {r['to']})"
    ]
    if r.get("reason"):
        lines.append(f"reason: {r['reason']}")
    metrics = r.get("metrics")
    if metrics:
        for role in ("candidate", "baseline"):
            m = metrics[role]
            p95 = "-" if m["p95_ms"] is None else f"{m['p95_ms']:.1f} ms"
            lines.append(
                f"{role}: {m['requests']} requests, {m['error_rate']:.1%} errors, p95 {p95}"
            )
    if r.get("decision"):
        lines.append(f"last decision: {r['decision']}")
    log = r.get("log") or []
    if log:
        lines.append(
            table(
                ["TIME", "ACTION", "STEP", "WEIGHT", "DETAIL"],
                [
                    [
                        human_age(s["ts"]),
                        s["action"],
                        str(s["step"]),
                        f"{s['weight']}%",
                        str(s["detail"].get("reason", "")),
                    ]
                    for s in log
                ],
            )
        )
    return "\n".join(lines)
