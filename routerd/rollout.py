"""The rollout controller: drives canaries step by step, on live per-version metrics.

A rollout moves a model's traffic from its current version (the baseline) to a
candidate in steps (e.g. 5, 25, 50, 100 percent). Starting one loads and warms the
candidate first and fails at once, with the reason, if it cannot be loaded (too
large, no room). Then, on every tick, for each running rollout the controller
observes the candidate and the baseline since the step began (``VersionStats``),
asks the pure ``policies.rollout.decide`` what to do, and does it: hold, advance
to the next step, promote (candidate takes all traffic, the baseline drains and is
evicted), or roll back (baseline takes all traffic back, the candidate drains and
is evicted). Every step is logged in SQLite with the metrics it was judged on.

Its state is the rollout rows in SQLite, nothing else: after a restart the running
rollouts carry on from their step (the candidate is loaded again in the
background) and paused ones stay paused. The controller runs as one background task
owned by the app (``cleanup_ctx``); ``tick`` is also callable directly, which is
how tests drive it with a fake clock instead of sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from policies.rollout import (
    Advance,
    Decision,
    Hold,
    Observation,
    Promote,
    Rollback,
    RolloutPlan,
    WindowStats,
    decide,
)
from routerd.errors import BadRequest, Conflict, NotFound, RouterdError
from routerd.router import Router
from routerd.scheduler import Scheduler
from routerd.traffic import RouteManager
from routerd.version_stats import VersionStats
from state import RolloutRecord, Store

log = logging.getLogger("routerd.rollout")


class RolloutController:
    def __init__(
        self,
        store: Store,
        router: Router,
        routes: RouteManager,
        scheduler: Scheduler,
        stats: VersionStats,
        *,
        clock: Callable[[], float] = time.time,
        tick_interval: float = 1.0,
    ) -> None:
        self._store = store
        self._router = router
        self._routes = routes
        self._scheduler = scheduler
        self._stats = stats
        self._clock = clock
        self.tick_interval = tick_interval
        self._lock = asyncio.Lock()
        self._last: dict[int, str] = {}  # rollout id → the latest decision, for status
        self._task: asyncio.Task[None] | None = None
        self._warming: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Resume running rollouts (candidate loaded again) and start ticking."""
        for rollout in self._store.rollouts(live=True):
            self._stats.keep_at_least(float(rollout.plan.get("interval_s", 0)) + 60)
            if rollout.status == "running":
                log.info(
                    "resuming rollout of %s to %s at step %d",
                    rollout.name,
                    rollout.to_version,
                    rollout.step + 1,
                )
                self._store.record_rollout_step(
                    rollout.id, "resumed_after_restart", step=rollout.step, weight=_weight(rollout)
                )
                candidate = self._router.table.versions.get(f"{rollout.name}@{rollout.to_version}")
                if candidate is not None:
                    warm = asyncio.create_task(self._warm(candidate.model_id), name="warm")
                    self._warming.add(warm)
                    warm.add_done_callback(self._warming.discard)
        self._task = asyncio.create_task(self._run(), name="rollouts")

    async def _warm(self, model_id: str) -> None:
        record = self._router.table.versions.get(model_id)
        if record is None:
            return
        try:
            await self._scheduler.load(record, why="rollout")
        except Exception as exc:
            log.warning("loading rollout candidate %s again failed: %s", model_id, exc)

    async def close(self) -> None:
        tasks = [*self._warming, *([self._task] if self._task is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # one bad tick must not end every rollout
                log.exception("rollout tick failed")
            await asyncio.sleep(self.tick_interval)

    # -- operators -------------------------------------------------------------------

    def _previous_version(self, name: str, newest: str) -> str:
        """The newest version of ``name`` other than ``newest`` that is not retired."""
        others = [
            record
            for record in self._router.table.versions.values()
            if record.name == name and record.version != newest and record.state != "retired"
        ]
        if not others:
            raise Conflict(
                f"{name}@{newest} is the only version of {name}: there is nothing to roll out from",
                param="to",
            )
        return max(others, key=lambda record: record.created_at).version

    async def begin(self, name: str, to_version: str, plan: RolloutPlan) -> RolloutRecord:
        """Start moving ``name`` to ``to_version``; the candidate is loaded first."""
        route = self._routes.current(name)
        candidate = self._routes.record(name, to_version)
        live = [w for w in route.weights.items() if w[1] > 0]
        if route.weights:
            if len(live) != 1:
                split = ", ".join(f"{v}={w}" for v, w in live)
                raise Conflict(
                    f"a rollout starts from one version; the route of {name} is split ({split}): "
                    f"set it to one version first (routerctl route set {name} VERSION=100)",
                    param="model",
                )
            from_version = live[0][0]
        else:
            from_version = self._router.resolve(name).version
            if from_version == to_version:
                # The usual order: register the new version, then roll out to it. With no
                # route the newest version takes the traffic, so the rollout starts from
                # the version that served before it was registered.
                from_version = self._previous_version(name, to_version)
        if from_version == to_version:
            raise Conflict(f"{name}@{to_version} already takes all the traffic", param="to")
        if self._store.rollouts(name=name, live=True):
            raise Conflict(f"a rollout of {name} is already in progress", param="model")
        self._stats.keep_at_least(plan.interval_s + 60)
        try:
            await self._scheduler.load(candidate, why="rollout")
        except RouterdError as exc:
            failed = self._store.create_rollout(
                name, from_version, to_version, plan.to_dict(), step_started_at=self._clock()
            )
            self._store.update_rollout(failed.id, status="failed", reason=exc.message)
            self._store.record_rollout_step(
                failed.id, "load_failed", step=0, weight=0, detail={"reason": exc.message}
            )
            raise type(exc)(
                f"rollout of {name} to {to_version} not started: {exc.message}",
                param=exc.param,
                code=exc.code,
                retry_after=exc.retry_after,
            ) from exc
        async with self._lock:
            try:
                rollout = self._store.create_rollout(
                    name, from_version, to_version, plan.to_dict(), step_started_at=self._clock()
                )
            except ValueError as exc:
                raise Conflict(str(exc), param="model") from exc
            self._store.record_rollout_step(
                rollout.id,
                "loaded",
                step=0,
                weight=0,
                detail={"model": candidate.model_id, "from": f"{name}@{from_version}"},
            )
            await self._apply_step(rollout, 0, action="step", detail={})
        log.info("rollout of %s: %s → %s started", name, from_version, to_version)
        return self._require(name)

    async def pause(self, name: str) -> RolloutRecord:
        async with self._lock:
            rollout = self._require(name)
            if rollout.status == "paused":
                raise Conflict(f"the rollout of {name} is already paused", param="model")
            updated = self._store.update_rollout(rollout.id, status="paused")
            self._log(updated, "pause")
            return updated

    async def resume(self, name: str) -> RolloutRecord:
        """Run again; the current step starts over, so it is judged on a full interval."""
        async with self._lock:
            rollout = self._require(name)
            if rollout.status == "running":
                raise Conflict(f"the rollout of {name} is not paused", param="model")
            updated = self._store.update_rollout(
                rollout.id, status="running", step_started_at=self._clock()
            )
            self._log(updated, "resume")
            return updated

    async def abort(self, name: str) -> RolloutRecord:
        """Give all traffic back to the baseline; the candidate drains and is evicted."""
        async with self._lock:
            rollout = self._require(name)
            return await self._roll_back(rollout, "aborted by an operator", status="aborted")

    def status(self, name: str) -> dict[str, Any]:
        """The latest rollout of ``name`` with its log and live metrics (404 if none)."""
        found = self._store.rollouts(name=name, limit=1)
        if not found:
            raise NotFound(f"{name} has never had a rollout", param="model")
        return self.describe(found[0], log=True)

    def list(self) -> list[dict[str, Any]]:
        return [self.describe(r, log=False) for r in self._store.rollouts(limit=50)]

    def describe(self, rollout: RolloutRecord, *, log: bool) -> dict[str, Any]:
        plan = rollout.plan
        body: dict[str, Any] = {
            "id": rollout.id,
            "name": rollout.name,
            "from": rollout.from_version,
            "to": rollout.to_version,
            "status": rollout.status,
            "step": rollout.step + 1,
            "steps": plan.get("steps", []),
            "weight": _weight(rollout),
            "plan": plan,
            "reason": rollout.reason,
            "step_started_at": rollout.step_started_at,
            "created_at": rollout.created_at,
            "updated_at": rollout.updated_at,
        }
        if rollout.live:
            seen = self._observe(rollout)
            body["metrics"] = {
                "candidate": _stats_json(seen.candidate),
                "baseline": _stats_json(seen.baseline),
                "step_elapsed_s": round(seen.elapsed_s, 1),
            }
            body["decision"] = self._last.get(rollout.id)
        if log:
            body["log"] = [
                {
                    "ts": s.ts,
                    "action": s.action,
                    "step": s.step + 1,
                    "weight": s.weight,
                    "detail": s.detail,
                }
                for s in self._store.rollout_steps(rollout.id)
            ]
        return body

    # -- ticking ---------------------------------------------------------------------

    async def tick(self) -> None:
        """Judge every running rollout once and act on the decisions."""
        async with self._lock:
            for rollout in self._store.rollouts(live=True):
                if rollout.status != "running":
                    continue
                try:
                    await self._tick_one(rollout)
                except Exception as exc:
                    log.warning("rollout of %s: %s", rollout.name, exc)
                    if isinstance(exc, RouterdError) and exc.status == 404:
                        self._fail(rollout, f"a version disappeared: {exc}")

    async def _tick_one(self, rollout: RolloutRecord) -> None:
        plan = RolloutPlan.from_dict(rollout.plan)
        seen = self._observe(rollout)
        decision = decide(plan, seen)
        self._last[rollout.id] = _describe(decision)
        detail = {
            "candidate": _stats_json(seen.candidate),
            "baseline": _stats_json(seen.baseline),
            "reason": _describe(decision),
        }
        if isinstance(decision, Hold):
            return
        if isinstance(decision, Advance):
            await self._apply_step(rollout, decision.step, action="step", detail=detail)
        elif isinstance(decision, Promote):
            await self._promote(rollout, decision.reason, detail)
        elif isinstance(decision, Rollback):
            await self._roll_back(rollout, decision.reason, detail=detail)

    def _observe(self, rollout: RolloutRecord) -> Observation:
        since = rollout.step_started_at
        candidate = self._stats.window(f"{rollout.name}@{rollout.to_version}", since=since)
        baseline_id = f"{rollout.name}@{rollout.from_version}"
        baseline = self._stats.window(baseline_id, since=since)
        plan_min = int(rollout.plan.get("min_requests", 20))
        if baseline.requests < plan_min:  # at high steps the baseline gets little traffic
            baseline = self._stats.recent(baseline_id)
        return Observation(
            step=rollout.step,
            elapsed_s=max(0.0, self._clock() - since),
            candidate=candidate,
            baseline=baseline,
        )

    # -- effects ---------------------------------------------------------------------

    async def _apply_step(
        self, rollout: RolloutRecord, step: int, *, action: str, detail: dict[str, Any]
    ) -> None:
        weight = int(rollout.plan["steps"][step])
        weights = {rollout.to_version: weight, rollout.from_version: 100 - weight}
        await self._routes.set_route(
            rollout.name,
            weights,
            reason=f"rollout {rollout.id} step {step + 1}: {rollout.to_version} at {weight}%",
            evict_dropped=False,
            why="rollout",
        )
        updated = self._store.update_rollout(rollout.id, step=step, step_started_at=self._clock())
        self._log(updated, action, detail)
        log.info("rollout of %s: %s at %d%%", rollout.name, rollout.to_version, weight)

    async def _promote(self, rollout: RolloutRecord, reason: str, detail: dict[str, Any]) -> None:
        await self._routes.set_route(
            rollout.name,
            {rollout.to_version: 100},
            reason=f"rollout {rollout.id} promoted {rollout.to_version}",
            evict_dropped=False,
        )
        updated = self._store.update_rollout(rollout.id, status="promoted", reason=reason)
        self._log(updated, "promote", detail)
        self._routes.drain_and_evict(self._routes.record(rollout.name, rollout.from_version))
        log.info("rollout of %s: %s promoted (%s)", rollout.name, rollout.to_version, reason)

    async def _roll_back(
        self,
        rollout: RolloutRecord,
        reason: str,
        *,
        status: str = "rolled_back",
        detail: dict[str, Any] | None = None,
    ) -> RolloutRecord:
        await self._routes.set_route(
            rollout.name,
            {rollout.from_version: 100},
            reason=f"rollout {rollout.id} {status.replace('_', ' ')}: {reason}",
            evict_dropped=False,
        )
        updated = self._store.update_rollout(rollout.id, status=status, reason=reason)
        self._log(updated, "rollback" if status == "rolled_back" else "abort", detail or {})
        self._routes.drain_and_evict(self._routes.record(rollout.name, rollout.to_version))
        log.warning(
            "rollout of %s to %s %s: %s",
            rollout.name,
            rollout.to_version,
            status.replace("_", " "),
            reason,
        )
        return updated

    def _fail(self, rollout: RolloutRecord, reason: str) -> None:
        updated = self._store.update_rollout(rollout.id, status="failed", reason=reason)
        self._log(updated, "failed", {"reason": reason})

    def _log(
        self, rollout: RolloutRecord, action: str, detail: dict[str, Any] | None = None
    ) -> None:
        self._store.record_rollout_step(
            rollout.id, action, step=rollout.step, weight=_weight(rollout), detail=detail or {}
        )

    def _require(self, name: str) -> RolloutRecord:
        live = self._store.rollouts(name=name, live=True, limit=1)
        if not live:
            raise NotFound(f"no rollout of {name} is in progress", param="model")
        return live[0]


def parse_plan(body: dict[str, Any]) -> RolloutPlan:
    """A plan from the admin API body, or a 400 naming the bad field."""
    try:
        return RolloutPlan.from_dict(
            {
                "steps": body.get("steps", [5, 25, 50, 100]),
                "interval_s": body.get("interval_s", 60.0),
                "max_error_rate": body.get("max_error_rate", 0.01),
                "max_p95_ratio": body.get("max_p95_ratio", 1.5),
                "min_requests": body.get("min_requests", 20),
                "latency_floor_ms": body.get("latency_floor_ms", 5.0),
            }
        )
    except ValueError as exc:
        raise BadRequest(f"rollout plan: {exc}", param="steps") from exc


def _weight(rollout: RolloutRecord) -> int:
    steps = rollout.plan.get("steps") or [0]
    if rollout.status == "promoted":
        return 100
    if rollout.status in ("rolled_back", "aborted", "failed"):
        return 0
    return int(steps[min(rollout.step, len(steps) - 1)])


def _stats_json(stats: WindowStats) -> dict[str, Any]:
    return {
        "requests": stats.requests,
        "errors": stats.errors,
        "error_rate": round(stats.error_rate, 6),
        "p95_ms": None if stats.p95_ms is None else round(stats.p95_ms, 3),
    }


def _describe(decision: Decision) -> str:
    kind = type(decision).__name__.lower()
    return f"{kind}: {decision.reason}"
