"""The STATUS body: plain msgpack-able data about workers, models, requests and counters.

Shape (DESIGN section 4 and `blockllm status --json` rely on workers[].pid/host/stages and
models):
    {"workers": [{"name", "pid", "host", "device", "stages": [{"key", "model", "start", "end",
                  "nbytes"}], "queue_depths", "kv_free_bytes", "kv_total_bytes", "free_slots",
                  "credit_slots", "inflight", "max_batch_size", "rss_bytes", "alive",
                  "banned_s", "steps", "step_ms_p50", "step_ms_p95", "mean_batch",
                  "expires_in_s"}],
     "models": {name: {"layers", "chain_len", "covered", "uncovered" (why not covered, in
                       words; "" when covered), "route": [[worker_name, [[start, end],
                       ...]], ...] | None, "running", "waiting", "planned_routes": [[route,
                       weight], ...], "substitutions": [{"position", "block", "from"}]}},
     "requests": {"running", "waiting"},
     "counters": {name: n for name in COUNTERS},
     "stats_endpoint": the broker's STATS PUB endpoint ("" when it publishes none),
     "totals": {"workers", "models"}: what the broker has (STATUS_REQUEST may filter the
               lists to one model and the workers serving it, or one worker and its models),
     "page": {"offset", "limit", "next"}: a STATUS answer lists entries [offset, offset +
             limit) of the workers and of the models, at most STATUS_PAGE of each; "next" is
             the next page's offset, 0 after the last (the clients fetch every page)}
    (workers[] also carry "memory_budget_bytes", "weight_bytes", "stage_batch_limits",
    "stage_mean_batch", "stage_step_ms", "draining", "last_error", "refused_blocks" and
    "pinned" for the planner, and
    "speculation": {"speculated", "accepted", "rejected"}, the worker's speculative runs, and
    "timings": the phases of its decode items, cumulative (broker/timings.py); the body's
    top-level "timings" are the broker loop's, for decode RESULTs)
"The chain really served" is the model's own chain with `substitutions` applied.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

from blockllm.broker.routing import Hop, WorkerView
from blockllm.broker.stage_index import LiveViews

if TYPE_CHECKING:
    from blockllm.broker.state import BrokerState
    from blockllm.broker.workers import WorkerState

RouteFn = Callable[[str, Mapping[Hashable, WorkerView]], "list[Hop] | None"]

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


def worker_entry(w: WorkerState, now: float) -> dict[str, Any]:
    return {
        "name": w.name,
        "pid": w.pid,
        "host": w.host,
        "device": w.device,
        "stages": [
            {
                "key": s.key,
                "model": s.model,
                "start": s.start,
                "end": s.end,
                "nbytes": s.nbytes,
                "dtype": s.dtype,
            }
            for s in w.stages
        ],
        "queue_depths": dict(w.queue_depths),
        "kv_free_bytes": w.kv_free_bytes,
        "kv_total_bytes": w.kv_total_bytes,
        "free_slots": w.free_slots,
        "credit_slots": w.credit_slots(),
        "inflight": len(w.inflight),
        "max_batch_size": w.max_batch_size,
        "rss_bytes": w.rss_bytes,
        "alive": True,  # expired workers are purged, not listed
        "banned_s": round(max(0.0, w.banned_until - now), 3),
        "steps": w.steps,
        "step_ms_p50": w.step_ms_p50,
        "step_ms_p95": w.step_ms_p95,
        "mean_batch": w.mean_batch,
        "expires_in_s": round(max(0.0, w.expires_at - now), 3),
        "memory_budget_bytes": w.memory_budget_bytes,
        "weight_bytes": w.weight_bytes,
        "stage_batch_limits": dict(w.stage_batch_limits),
        "stage_mean_batch": dict(w.stage_mean_batch),
        "stage_step_ms": dict(w.stage_step_ms),
        "stage_adapters": dict(w.stage_adapters),
        "draining": sorted(w.draining),
        "last_error": w.last_error,
        "refused_blocks": list(w.refused_blocks),
        "pinned": list(w.pinned),
        "speculation": {k: w.speculation.get(k, 0) for k in ("speculated", "accepted", "rejected")},
        "timings": dict(w.timings),
        "kv_geometries": [
            {
                "label": g.label,
                "page_size": g.page_size,
                "used_bytes": g.used_bytes,
                "sequences": g.sequences,
                "stages": g.stages,
                "page_bytes": g.page_bytes,
            }
            for g in w.kv_geometries
        ],
    }


def _route_entry(b: BrokerState, route: list[Hop]) -> list[list[Any]]:
    return [[b.workers[h.worker].name, [list(span) for span in h.spans]] for h in route]


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


def model_entry(b: BrokerState, route_of: RouteFn, name: str, now: float) -> dict[str, Any]:
    spec = b.models[name]
    # views built lazily: routing reads only the workers the routing index names for the model
    unbanned = LiveViews(b.workers, lambda p, w: not w.banned(now))
    route = route_of(name, unbanned)
    if route is None:  # show the route banned workers give, if only bans are in the way
        route = route_of(name, LiveViews(b.workers, lambda p, w: True))
    mine = [r for rid in b.by_model.get(name, ()) if (r := b.requests.get(rid)) is not None]
    return {
        "layers": spec.num_layers,
        "chain_len": spec.chain_len,
        "covered": route is not None,
        "uncovered": "" if route is not None else uncovered_reason(b, name, now),
        "route": None if route is None else _route_entry(b, route),
        "running": sum(1 for r in mine if r.route is not None),
        "waiting": sum(1 for r in mine if r.route is None),
        "planned_routes": [
            [[[h.worker, [list(sp) for sp in h.spans]] for h in r.hops], r.weight]
            for r in b.preferred.get(name, ())
        ],
        "substitutions": b.substitutions(name),
    }


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
) -> dict[str, Any]:
    """The body (module docstring). `model`: only that model and the workers with a stage
    serving it; `worker`: only that worker and the models it has a stage of (both: both
    filters); "totals" counts what the broker has, filtered or not. `offset`/`limit`: one
    page of both lists (None: all, what STATS carries); "page" says where the next starts."""
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
        page = {"offset": offset, "limit": limit, "next": end if more else 0}
        workers, names = workers[offset:end], names[offset:end]
    body = {
        "workers": [worker_entry(w, now) for w in workers],
        "models": {name: model_entry(b, route_of, name, now) for name in names},
        "requests": {"running": running, "waiting": len(b.requests) - running},
        "counters": dict(b.counters),
        "timings": b.timings.snapshot(),
        "stats_endpoint": b.stats_endpoint,
        "totals": {"workers": len(b.workers), "models": len(b.models)},
    }
    if page is not None:
        body["page"] = page
    return body


def _serves(b: BrokerState, model: str, w: WorkerState) -> bool:
    """Whether one of w's stages serves `model` (its key over the span is the model's)."""
    return any(b.key_of(model, s.start, s.end) == s.key for s in w.stages)
