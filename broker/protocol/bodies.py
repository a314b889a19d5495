"""The typed bodies of STATUS (broker -> client) and STATS (broker -> planner), and the routes
the planner sets (PlannedHop, PlannedRoute: SET_ROUTES, and the routes both bodies show).

Like every message they are frozen dataclasses encoded as msgpack arrays of their fields in
declaration order; fields are only appended, each with a default, so an older peer's shorter
array decodes to the defaults. STATUS and STATS share the worker entry (`WorkerStatus`); a
model's entry is `ModelStatus` in STATUS and `ModelStats` (the same fields, then demand and
latency) in STATS. Filled in by broker/status.py and broker/stats.py.

`plain()` turns a body into the JSON-shaped data `blockllm status --json`, the client library
(`Client.status()`) and the HTTP front end show: maps of field names, routes as arrays
(`[[worker, [[start, end], ...]], ...]`), a substitution's `from_` as "from".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from blockllm.broker.protocol.data import KVGeometryUse, StageRef


@dataclass(frozen=True, slots=True)
class PlannedHop:
    """One hop of a planned route: a worker (by name) and the chain spans it runs."""

    worker: str
    spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class PlannedRoute:
    """A route the planner prefers for a model; requests spread over routes by `weight`."""

    hops: tuple[PlannedHop, ...]
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class SpeculationCounts:
    """A worker's speculative runs (worker/speculate.py): started, answered, rerun."""

    speculated: int = 0
    accepted: int = 0
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One live worker, in STATUS and STATS: what it registered with (READY), its load (last
    HEARTBEAT) and what the broker knows of it (credit, bans, drains, expiry)."""

    name: str
    pid: int = 0
    host: str = ""
    device: str = ""
    stages: tuple[StageRef, ...] = ()
    queue_depths: dict[str, int] = field(default_factory=dict)
    kv_free_bytes: int = 0
    kv_total_bytes: int = 0
    free_slots: int = 0
    credit_slots: int = 0
    inflight: int = 0
    max_batch_size: int = 0
    rss_bytes: int = 0
    alive: bool = True  # expired workers are purged, not listed
    banned_s: float = 0.0
    steps: int = 0
    step_ms_p50: float = 0.0
    step_ms_p95: float = 0.0
    mean_batch: float = 0.0
    expires_in_s: float = 0.0
    memory_budget_bytes: int = 0
    weight_bytes: int = 0
    stage_batch_limits: dict[str, int] = field(default_factory=dict)
    stage_mean_batch: dict[str, float] = field(default_factory=dict)
    stage_step_ms: dict[str, float] = field(default_factory=dict)
    stage_adapters: dict[str, int] = field(default_factory=dict)
    draining: tuple[str, ...] = ()
    last_error: str = ""
    refused_blocks: tuple[str, ...] = ()
    pinned: tuple[str, ...] = ()
    speculation: SpeculationCounts = field(default_factory=SpeculationCounts)
    timings: dict[str, float] = field(default_factory=dict)  # its decode phases (timings.py)
    kv_geometries: tuple[KVGeometryUse, ...] = ()


@dataclass(frozen=True, slots=True)
class Substitution:
    """A chain position served by another model's block (adaptive assembly): the block, and
    the model (by name) whose own chain has it there (None: none)."""

    position: int
    block: str
    from_: str | None = None


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One model in STATUS: coverage (and why not, in words), its route now, its requests,
    the planner's routes and the chain substitutions it is served with."""

    layers: int = 0
    chain_len: int = 0
    covered: bool = False
    uncovered: str = ""
    route: tuple[PlannedHop, ...] | None = None
    running: int = 0
    waiting: int = 0
    planned_routes: tuple[PlannedRoute, ...] = ()
    substitutions: tuple[Substitution, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelStats:
    """One model in STATS: ModelStatus's fields (in its order), then demand and latency over
    the broker's window (broker/stats.py), then `route_stale`. A field appended to ModelStatus
    is appended here too, after the last one."""

    layers: int = 0
    chain_len: int = 0
    covered: bool = False
    uncovered: str = ""
    route: tuple[PlannedHop, ...] | None = None
    running: int = 0
    waiting: int = 0
    planned_routes: tuple[PlannedRoute, ...] = ()
    substitutions: tuple[Substitution, ...] = ()
    rate_rps: float = 0.0
    token_rate: float = 0.0
    ttft_ms_p50: float = 0.0
    ttft_ms_p95: float = 0.0
    tpot_ms_p50: float = 0.0
    tpot_ms_p95: float = 0.0
    completed: int = 0
    # the route shown is the previous one, out of date: its inputs changed and it is
    # recomputed within a few snapshots (broker/shown.py: a bounded number per STATS); the
    # planner does not take it for the broker's route now. Never set in STATUS.
    route_stale: bool = False


@dataclass(frozen=True, slots=True)
class RequestCounts:
    running: int = 0
    waiting: int = 0


@dataclass(frozen=True, slots=True)
class Totals:
    """What the broker has, whatever a STATUS filter or page lists."""

    workers: int = 0
    models: int = 0


@dataclass(frozen=True, slots=True)
class StatusPage:
    """A STATUS page: entries [offset, offset + limit) of both lists; `next` the next page's
    offset, 0 after the last."""

    offset: int = 0
    limit: int = 0
    next: int = 0


@dataclass(frozen=True, slots=True)
class StatusBody:
    """STATUS: workers (by registration) and models (by name), maybe filtered and paged
    (StatusRequest), request counts, the broker's counters and loop timings, its STATS PUB
    endpoint ("" when it publishes none), totals, and the page (None: the whole lists)."""

    workers: tuple[WorkerStatus, ...] = ()
    models: dict[str, ModelStatus] = field(default_factory=dict)
    requests: RequestCounts = field(default_factory=RequestCounts)
    counters: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    stats_endpoint: str = ""
    totals: Totals = field(default_factory=Totals)
    page: StatusPage | None = None


@dataclass(frozen=True, slots=True)
class StatsBody:
    """STATS: the whole lists (models with demand and latency), the same summary as STATUS,
    and the broker's clock (`time`, monotonic s), `interval_s` between snapshots and
    `catalog_gen` (moves on a zoo reload: the planner re-reads its catalog)."""

    workers: tuple[WorkerStatus, ...] = ()
    models: dict[str, ModelStats] = field(default_factory=dict)
    requests: RequestCounts = field(default_factory=RequestCounts)
    counters: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    stats_endpoint: str = ""
    totals: Totals = field(default_factory=Totals)
    time: float = 0.0
    interval_s: float = 0.0
    catalog_gen: int = 0


_ARRAYS = (PlannedHop, PlannedRoute)  # shown as arrays, as on the wire
_NAMES = {"from_": "from"}


def plain(value: Any) -> Any:
    """JSON-shaped data of a body or entry (module docstring); a StatusBody's page only when
    it has one."""
    if isinstance(value, _ARRAYS):
        return [plain(getattr(value, f.name)) for f in dataclasses.fields(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if not (f.name == "page" and v is None):
                out[_NAMES.get(f.name, f.name)] = plain(v)
        return out
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
