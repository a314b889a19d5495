"""What the planner reads of a STATS body (protocol StatsBody, broker/stats.py): each worker's
facts, each model's routes. The body is typed and validated when decoded: pure reading.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from blockllm.broker.protocol import ModelStats, PlannedRoute, StageRef, WorkerStatus


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
    host: str = ""  # the machine it runs on (READY's host): its node for placement

    @classmethod
    def parse(cls, w: WorkerStatus, default_memory: int) -> WorkerFacts:
        budget = w.memory_budget_bytes or default_memory
        capacity = budget - w.kv_total_bytes if budget else math.inf
        return cls(
            name=w.name,
            stages={s.key: s for s in w.stages},
            capacity=float(capacity),
            step_ms_p50=w.step_ms_p50,
            steps=w.steps,
            queued=sum(w.queue_depths.values()),
            draining=frozenset(w.draining),
            weight_bytes=w.weight_bytes,
            queues=dict(w.queue_depths),
            stage_ms=dict(w.stage_step_ms),
            refused=frozenset(w.refused_blocks),
            pinned=frozenset(w.pinned),
            kv_budget_bytes=w.kv_total_bytes,
            kv_page_bytes=max((g.page_bytes for g in w.kv_geometries), default=0),
            host=w.host,
        )


def live_routes(models: Mapping[str, ModelStats]) -> dict[str, tuple[PlannedRoute, ...]]:
    """Each model's routes in a STATS body: the planned ones with their weights when the
    planner set some, else the route the broker picks by itself (not a stale one: the
    broker's previous route, out of date)."""
    out: dict[str, tuple[PlannedRoute, ...]] = {}
    for name, m in models.items():
        if m.planned_routes:
            out[name] = m.planned_routes
        elif m.route and not m.route_stale:
            out[name] = (PlannedRoute(m.route),)
    return out


def current_routes(models: Mapping[str, ModelStats]) -> dict[str, PlannedRoute]:
    """Each model's route in a STATS body (the one the broker picks now; a stale one, the
    broker's previous route out of date, is left out)."""
    return {
        name: PlannedRoute(m.route) for name, m in models.items() if m.route and not m.route_stale
    }
