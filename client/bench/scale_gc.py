"""The garbage collector in the scale simulation (client/bench/scale_sim.py): the broker's GC
policy (broker/gc_policy.py) applied as BrokerProc applies it, and the CPU time of the
collections that start inside broker calls, per message kind, reported beside the calls' CPU
time (which includes it), so the bench shows the routing cost and the collector's cost side
by side.

What the simulation assumes: the simulated workers, clients and the planner live in the
broker's process, so the collector walks their objects too; the policy freezes them with the
broker's, and the collections inside broker calls cost what the whole process's young
objects cost, more than a broker process of its own would.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from blockllm.broker.gc_policy import GcPolicy


class GcMeter:
    """CPU time of the collections while entered (gc.callbacks): `spent` in all of them (the
    STATS turns read it: client/bench/scale_stats.py), and of those that run while `kind` is
    set (a broker call): per kind, [collections, CPU s], per generation the collections."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.spent = 0.0
        self.by_kind: dict[str, list[float]] = {}
        self.by_generation: dict[int, int] = {}
        self.longest_s = 0.0  # the longest collection inside a broker call
        self._t0 = 0.0

    def __enter__(self) -> GcMeter:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self)

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.process_time()
            return
        dt = time.process_time() - self._t0
        self.spent += dt
        if self.kind is None:
            return
        acc = self.by_kind.setdefault(self.kind, [0, 0.0])
        acc[0] += 1
        acc[1] += dt
        self.longest_s = max(self.longest_s, dt)
        gen = int(info.get("generation", -1))
        self.by_generation[gen] = self.by_generation.get(gen, 0) + 1


@contextmanager
def measured(sim: Any, policy: bool = True) -> Iterator[GcMeter]:
    """`sim`'s meter of the collections inside its broker calls (`Sim.gc_meter`, entered
    while it runs), with the broker's GC policy applied (`policy`) until the block ends; the
    collector is left as it was."""
    if policy:
        sim.gc_policy = GcPolicy()
        sim.gc_policy.start()
    try:
        yield sim.gc_meter
    finally:
        if sim.gc_policy is not None:
            sim.gc_policy.stop()
        sim.gc_policy = None


def figures(meter: GcMeter, by_kind: dict[str, list[float]], routed: int) -> dict[str, Any]:
    """The bench's GC figures: per message of each kind, the CPU us of the collections that
    started inside it (`broker_us_by_kind` includes them), and over the FORWARDs routed."""
    total = sum(cpu for _, cpu in meter.by_kind.values())
    return {
        "broker_gc_us_by_kind": {
            k: round(1e6 * meter.by_kind.get(k, [0, 0.0])[1] / max(1, calls), 1)
            for k, (calls, _) in sorted(by_kind.items())
        },
        "broker_gc_us_per_message": round(1e6 * total / max(1, routed), 1),
        "broker_gc_collections": {str(g): n for g, n in sorted(meter.by_generation.items())},
        "broker_gc_ms_max": round(1000 * meter.longest_s, 1),
    }


def full_collection_ms(sim: Any) -> float:
    """The pause of the policy's periodic full collection now (every object in the process:
    the simulated cluster's and the planner's too), ms CPU; 0 without the policy."""
    if sim.gc_policy is None:
        return 0.0
    sim.gc_policy.full()
    return round(1000 * sim.gc_policy.last_full_s, 1)
