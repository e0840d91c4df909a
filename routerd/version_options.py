"""A version's own settings, typed: checked once at registration, read as attributes.

A registered version's options hold two kinds of keys: the backend's own (dtype,
context, ...), which only the backend reads, and the ones routerd reads itself,
listed in ``SCHEDULER_OPTIONS``. ``normalize`` checks routerd's when a version is
registered (``routerd.registry``); ``options_of(record)`` turns a stored record's
into a ``VersionOptions`` once per record, so the scheduler and the request path
read typed attributes instead of dictionary keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from contract.errors import InvalidRequest
from policies import registry as policy_registry
from policies.batching import DEFAULT_BATCHING, BatchingPolicy
from policies.placement import is_device_preference
from policies.registry import check as check_policy
from routerd.config import ConfigError, parse_duration, parse_keep_alive
from state import VersionRecord

# Options of the batching policy (``batching`` names it; the rest are its parameters).
BATCHING_OPTIONS = ("batching", "max_batch_size", "max_wait_ms", "max_batch_tokens")
# Options that let a version run more than one instance, and how it scales.
REPLICA_OPTIONS = ("replicas", "max_replicas", "scale_up_queue", "scale_down_idle", "routing")
# Options the API layer reads: ``max_tokens`` caps the completion tokens of one request.
API_OPTIONS = ("max_tokens",)
SCHEDULER_OPTIONS = frozenset(
    (
        "device",
        "devices",
        "keep_alive",
        "max_queue",
        *BATCHING_OPTIONS,
        *REPLICA_OPTIONS,
        *API_OPTIONS,
    )
)
"""Keys routerd reads itself; every other option belongs to the backend."""

_POSITIVE = ("replicas", "max_replicas", "scale_up_queue", "max_tokens")


@dataclass(frozen=True, slots=True)
class VersionOptions:
    """What routerd reads of one version's options; ``None`` means its own default."""

    devices: tuple[str, ...] = ("auto",)  # placement preferences, in order
    keep_alive: float | None = None  # seconds idle before unloading; inf: never
    max_queue: int | None = None  # requests waiting before 429; 0: no limit
    replicas: int = 1  # instances kept
    max_replicas: int = 1  # instances at most, when busy
    several: bool = False  # ``replicas`` or ``max_replicas`` was given
    scale_up_queue: int = 4  # requests per replica that count as busy
    scale_down_idle: float | None = None  # seconds before an extra replica leaves
    routing: str | None = None  # routing policy among replicas
    max_tokens: int | None = None  # completion tokens per request, at most
    batching: Mapping[str, Any] = field(default_factory=dict)  # the batching policy's

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> VersionOptions:
        """From normalized options (as ``normalize`` returns and the store keeps)."""
        devices = options.get("devices")
        keep_alive = options.get("keep_alive")
        if keep_alive is not None:
            keep_alive = parse_keep_alive(keep_alive, key="keep_alive")
        replicas = int(options.get("replicas", 1))
        return cls(
            devices=tuple(devices) if devices else (str(options.get("device", "auto")),),
            keep_alive=keep_alive,
            max_queue=options.get("max_queue"),
            replicas=replicas,
            max_replicas=max(int(options.get("max_replicas", replicas)), replicas),
            several="replicas" in options or "max_replicas" in options,
            scale_up_queue=int(options.get("scale_up_queue", 4)),
            scale_down_idle=options.get("scale_down_idle"),
            routing=None if options.get("routing") is None else str(options["routing"]),
            max_tokens=options.get("max_tokens"),
            batching={k: options[k] for k in BATCHING_OPTIONS if k in options},
        )


def normalize(options: Mapping[str, Any]) -> dict[str, Any]:
    """routerd's keys of ``options`` checked and normalized for storing (durations in
    seconds, keep-alive -1 for never, as the config spells it); others untouched.

    Raises InvalidRequest naming ``options.<key>``.
    """
    normalized = dict(options)
    _check_devices(normalized)
    if "keep_alive" in normalized:
        try:
            seconds = parse_keep_alive(normalized["keep_alive"], key="keep_alive")
        except ConfigError as exc:
            raise InvalidRequest(str(exc), param="options.keep_alive") from None
        # Stored as JSON, which has no infinity: -1 means never, as in the config.
        normalized["keep_alive"] = -1 if math.isinf(seconds) else seconds
    for key in _POSITIVE:
        value = normalized.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(
                f"option {key} must be a positive integer, got {value!r}", param=f"options.{key}"
            )
    if "max_replicas" in normalized and normalized["max_replicas"] < normalized.get("replicas", 1):
        raise InvalidRequest(
            "option max_replicas must be at least replicas", param="options.max_replicas"
        )
    if "max_queue" in normalized:
        value = normalized["max_queue"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidRequest(
                f"option max_queue must be an integer >= 0 (0: no limit), got {value!r}",
                param="options.max_queue",
            )
    if "scale_down_idle" in normalized:
        try:
            normalized["scale_down_idle"] = parse_duration(
                normalized["scale_down_idle"], key="scale_down_idle"
            )
        except ConfigError as exc:
            raise InvalidRequest(str(exc), param="options.scale_down_idle") from None
    if "routing" in normalized:
        try:
            check_policy("routing", str(normalized["routing"]))
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="options.routing") from None
    batching = {k: v for k, v in normalized.items() if k in BATCHING_OPTIONS}
    if batching:
        try:
            batching_policy(batching, "cpu")
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"batching options: {exc}", param="options.batching") from None
    return normalized


def _check_devices(options: Mapping[str, Any]) -> None:
    if "device" in options:
        device = options["device"]
        if not isinstance(device, str) or not is_device_preference(device):
            raise InvalidRequest(
                f"option device must be auto, cpu, cuda or cuda:N, got {device!r}",
                param="options.device",
            )
    if "devices" in options:
        devices = options["devices"]
        if (
            not isinstance(devices, list)
            or not devices
            or not all(isinstance(d, str) and is_device_preference(d) for d in devices)
        ):
            raise InvalidRequest(
                'option devices must be a list such as ["cuda", "cpu"] of auto, cpu, cuda, '
                f"cuda:N; got {devices!r}",
                param="options.devices",
            )


_PARSED: dict[str, tuple[VersionRecord, VersionOptions]] = {}


def options_of(record: VersionRecord) -> VersionOptions:
    """``record``'s options, typed; built once per record (a re-registered version is a
    new record) and then only looked up, since the request path reads them."""
    hit = _PARSED.get(record.model_id)
    if hit is not None and hit[0] is record:
        return hit[1]
    parsed = VersionOptions.of(record.options)
    _PARSED[record.model_id] = (record, parsed)
    return parsed


def batching_policy(options: Mapping[str, Any], device: str) -> BatchingPolicy:
    """The policy a version asks for in its options, with the device kind's defaults."""
    name = str(options.get("batching", "dynamic"))
    params: dict[str, Any] = {}
    if name == "dynamic":
        params.update(DEFAULT_BATCHING["cuda" if device.startswith("cuda") else "cpu"])
    params.update({k: options[k] for k in BATCHING_OPTIONS[1:] if k in options})
    policy_registry.check("batching", name)
    policy: BatchingPolicy = policy_registry.create("batching", name, **params)
    return policy
