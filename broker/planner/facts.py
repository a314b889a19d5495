"""What the planner reads of a STATS body (broker/stats.py): each worker's facts, each model's
routes. Pure parsing; a malformed entry raises KeyError/TypeError/ValueError (the Planner skips
it) or, for a route, is left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from blockllm.broker.protocol import PlannedHop, PlannedRoute, StageRef


@dataclass
class WorkerFacts:
    """One worker of a STATS snapshot, as the planner reads it."""

    name: str
    stages: dict[str, StageRef]
    capacity: float
    step_ms_p50: float = 0.0
    steps: int = 0
    queued: int = 0
    draining: frozenset[str] = frozenset()
    weight_bytes: int = 0
    queues: dict[str, int] = field(default_factory=dict)  # stage key -> items queued
    stage_ms: dict[str, float] = field(default_factory=dict)  # stage key -> ms per forward
    refused: frozenset[str] = frozenset()  # block ids it cannot get (a corrupt source)
    pinned: frozenset[str] = frozenset()  # stage keys its operator configured: kept
    kv_budget_bytes: int = 0  # the KV arena's bytes (0: unknown, not limited)
    kv_page_bytes: int = 0  # what one KV page costs (0: no arena yet)

    @classmethod
    def parse(cls, w: Mapping[str, Any], default_memory: int) -> WorkerFacts:
        stages = {
            s["key"]: StageRef(s["key"], s["model"], s["start"], s["end"], s.get("nbytes", 0))
            for s in w.get("stages", ())
        }
        budget = w.get("memory_budget_bytes") or default_memory
        capacity = budget - w.get("kv_total_bytes", 0) if budget else math.inf
        queues = w.get("queue_depths") or {}
        geometries = w.get("kv_geometries") or ()
        return cls(
            name=w["name"],
            stages=stages,
            capacity=float(capacity),
            step_ms_p50=float(w.get("step_ms_p50") or 0.0),
            steps=int(w.get("steps") or 0),
            queued=sum(queues.values()),
            draining=frozenset(w.get("draining") or ()),
            weight_bytes=int(w.get("weight_bytes") or 0),
            queues={str(k): int(v) for k, v in queues.items()},
            stage_ms={str(k): float(v) for k, v in (w.get("stage_step_ms") or {}).items()},
            refused=frozenset(str(b) for b in w.get("refused_blocks") or ()),
            pinned=frozenset(str(k) for k in w.get("pinned") or ()),
            kv_budget_bytes=int(w.get("kv_total_bytes") or 0),
            kv_page_bytes=max((int(g.get("page_bytes") or 0) for g in geometries), default=0),
        )


def live_routes(models: Mapping[str, Any]) -> dict[str, tuple[PlannedRoute, ...]]:
    """Each model's routes in a STATS body: the planned ones with their weights when the
    planner set some, else the route the broker picks by itself."""
    out: dict[str, tuple[PlannedRoute, ...]] = {}
    single = current_routes(models)
    for name, m in models.items():
        planned = m.get("planned_routes") if isinstance(m, Mapping) else None
        try:
            routes = tuple(
                PlannedRoute(_hops(hops), float(weight)) for hops, weight in planned or ()
            )
        except (TypeError, ValueError):
            routes = ()
        if routes:
            out[name] = routes
        elif name in single:
            out[name] = (single[name],)
    return out


def _hops(hops: Any) -> tuple[PlannedHop, ...]:
    return tuple(PlannedHop(w, tuple((int(a), int(b)) for a, b in spans)) for w, spans in hops)


def current_routes(models: Mapping[str, Any]) -> dict[str, PlannedRoute]:
    """Each model's route in a STATS body (`[[worker, [[start, end], ...]], ...]`)."""
    routes = {}
    for name, m in models.items():
        hops = m.get("route") if isinstance(m, Mapping) else None
        if not hops:
            continue
        try:
            routes[name] = PlannedRoute(
                tuple(PlannedHop(w, tuple((int(a), int(b)) for a, b in spans)) for w, spans in hops)
            )
        except (TypeError, ValueError):
            continue
    return routes
