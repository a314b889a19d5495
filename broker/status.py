"""The STATUS body (broker/protocol/bodies.py StatusBody): workers, models, requests, counters.

Each worker's entry (WorkerStatus) is what it registered with and reported last, and what the
broker knows of it (credit, bans, drains, expiry); each model's (ModelStatus) its coverage (and
why not, in words an operator can act on), its route (the one a new request would get from
idle workers: broker/shown.py, which caches it between builds), its requests, the planner's
routes and its chain substitutions ("the chain really served" is the model's own chain with them
applied). `totals` counts what the broker has: a STATUS_REQUEST may filter the lists to one
model and the workers serving it, or one worker and its models, and a STATUS answer lists one
page (entries [offset, offset + limit), at most STATUS_PAGE of each list; `page.next` is the
next page's offset, 0 after the last: the clients fetch every page). `blockllm status --json`
shows it as `protocol.plain()` renders it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blockllm.broker.protocol import (
    ModelStatus,
    RequestCounts,
    SpeculationCounts,
    StatusBody,
    StatusPage,
    Totals,
    WorkerStatus,
)
from blockllm.broker.shown import RouteFn, ShownRoutes

if TYPE_CHECKING:
    from blockllm.broker.state import BrokerState
    from blockllm.broker.workers import WorkerState


COUNTERS = (
    "requests",
    "completed",
    "failed",
    "rejected",
    "overloaded",
    "timeouts",
    "cancelled",
    "tokens",
    "replays",
    "bad_messages",
    "stale_results",
    "dropped_sends",
    "workers_expired",
    "unknown_worker_messages",
    "internal_errors",
    "moved",
    "commands",
    "hedges",
    "hedges_won",
    "migrations",
    "migrations_failed",
    "migrated_bytes",
    "speculated",  # SPECULATE messages sent (models with a speculation tolerance)
)


SPECULATION = ("speculated", "accepted", "rejected")


def worker_entry(w: WorkerState, now: float) -> WorkerStatus:
    return WorkerStatus(
        name=w.name,
        pid=w.pid,
        host=w.host,
        device=w.device,
        stages=w.stages,
        queue_depths=dict(w.queue_depths),
        kv_free_bytes=w.kv_free_bytes,
        kv_total_bytes=w.kv_total_bytes,
        free_slots=w.free_slots,
        credit_slots=w.credit_slots(),
        inflight=len(w.inflight),
        max_batch_size=w.max_batch_size,
        rss_bytes=w.rss_bytes,
        banned_s=round(max(0.0, w.banned_until - now), 3),
        steps=w.steps,
        step_ms_p50=w.step_ms_p50,
        step_ms_p95=w.step_ms_p95,
        mean_batch=w.mean_batch,
        expires_in_s=round(max(0.0, w.expires_at - now), 3),
        memory_budget_bytes=w.memory_budget_bytes,
        weight_bytes=w.weight_bytes,
        stage_batch_limits=dict(w.stage_batch_limits),
        stage_mean_batch=dict(w.stage_mean_batch),
        stage_step_ms=dict(w.stage_step_ms),
        stage_adapters=dict(w.stage_adapters),
        draining=tuple(sorted(w.draining)),
        last_error=w.last_error,
        refused_blocks=tuple(w.refused_blocks),
        pinned=tuple(w.pinned),
        speculation=SpeculationCounts(**{k: w.speculation.get(k, 0) for k in SPECULATION}),
        timings=dict(w.timings),
        kv_geometries=tuple(w.kv_geometries),
    )


PLANNER_STALE_S = 10.0  # no PLANNER_REPORT for this long: no planner is connected


def uncovered_reason(b: BrokerState, name: str, now: float) -> str:
    """Why no live worker set covers model `name`, in words an operator can act on."""
    if not b.workers:
        return "no worker is registered"
    if b.planner_seen is None or now - b.planner_seen > PLANNER_STALE_S:
        return (
            "no planner is connected (start `blockllm planner --broker ADDR`) and no workers "
            "host all of its stages"
        )
    return b.planner_notes.get(name) or "the planner has not placed it yet"


def model_entry(
    b: BrokerState, route_of: RouteFn, name: str, now: float, shown: ShownRoutes
) -> ModelStatus:
    """`name`'s entry; its route and substitutions from `shown` (refreshed for `now`)."""
    spec = b.models[name]
    mine = [r for rid in b.by_model.get(name, ()) if (r := b.requests.get(rid)) is not None]
    (route, substitutions), _stale = shown.get(b, route_of, name)  # never stale: no bound
    running = sum(1 for r in mine if r.route is not None)
    return ModelStatus(
        layers=spec.num_layers,
        chain_len=spec.chain_len,
        covered=route is not None,
        uncovered="" if route is not None else uncovered_reason(b, name, now),
        route=route,
        running=running,
        waiting=len(mine) - running,
        planned_routes=b.preferred.get(name, ()),
        substitutions=substitutions,
    )


STATUS_PAGE = 128  # workers and models per STATUS at most: one answer stays well under 1 MiB


def status_body(
    b: BrokerState,
    route_of: RouteFn,
    now: float,
    *,
    model: str = "",
    worker: str = "",
    offset: int = 0,
    limit: int | None = None,
    shown: ShownRoutes | None = None,
) -> StatusBody:
    """The body (module docstring). `model`: only that model and the workers with a stage
    serving it; `worker`: only that worker and the models it has a stage of (both: both
    filters); "totals" counts what the broker has, filtered or not. `offset`/`limit`: one
    page of both lists (None: all, what STATS carries); "page" says where the next starts.
    `shown`: the routes shown, cached (broker/shown.py; None: the state's)."""
    shown = b.shown if shown is None else shown
    shown.refresh(b, now)
    running = sum(1 for r in b.requests.values() if r.route is not None)
    workers = sorted(b.workers.values(), key=lambda w: w.registered_at)
    names = sorted(b.models)
    if worker:
        workers = [w for w in workers if w.name == worker]
        names = [n for n in names if any(_serves(b, n, w) for w in workers)]
    if model:
        names = [n for n in names if n == model]
        workers = [w for w in workers if any(_serves(b, n, w) for n in names)]
    page = None
    if limit is not None:
        limit = STATUS_PAGE if limit <= 0 else min(limit, STATUS_PAGE)
        offset = max(0, offset)
        end = offset + limit
        more = end < max(len(workers), len(names))
        page = StatusPage(offset, limit, end if more else 0)
        workers, names = workers[offset:end], names[offset:end]
    return StatusBody(
        workers=tuple(worker_entry(w, now) for w in workers),
        models={name: model_entry(b, route_of, name, now, shown) for name in names},
        requests=RequestCounts(running, len(b.requests) - running),
        counters=dict(b.counters),
        timings=b.timings.snapshot(),
        stats_endpoint=b.stats_endpoint,
        totals=Totals(len(b.workers), len(b.models)),
        page=page,
    )


def _serves(b: BrokerState, model: str, w: WorkerState) -> bool:
    """Whether one of w's stages serves `model` (its key over the span is the model's)."""
    return any(b.key_of(model, s.start, s.end) == s.key for s in w.stages)
