"""Re-placing after a lost worker: incrementally when the target's search state still describes
the cluster, with a full placement only when the incremental one is not acceptable. Every
full placement keeps the target's replicas where they still fit (placement_keep.py).

A full `place` after one lost worker walks every model again (about 0.5 s at 2,000 models;
with the target's replicas kept where they fit it moves little, and without them the
tie-breaks by load share would move replicas that never touched the lost worker).
`placement.replace_lost` re-places only the replicas that had a segment on the lost workers,
from the search state (`Cluster`) the target was made with, in milliseconds.
It applies when nothing else that state was made from changed (`lost_workers`): the same
models (chains, sizes, owners, work; their demand may have moved: the replicas wanted stay the
target's, as `replace_lost` says), the survivors with the same budgets and refused blocks, and
no new worker (a spawned one aside: the placement prefers the others, spawn.py). The result is
acceptable when it leaves no model uncovered that the target covered; otherwise a full
placement is made, and taken when it covers more demand (else the incremental one is kept:
it moves less).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from blockllm.broker.planner.placement import (
    ModelInfo,
    Placement,
    WorkerInfo,
    place_in,
    replace_lost,
)
from blockllm.broker.planner.placement_index import Cluster

if TYPE_CHECKING:
    from blockllm.broker.planner.planner import Planner

Full = Callable[[], tuple[Placement, Cluster]]
# re-placements for demand alone: made only when worth their cost (Planner._worth_it); only
# they bound the load kept replicas pile on a worker (placement._spread: it moves replicas)
DEMAND_REASONS = frozenset({"demand", "demand changed"})


def placement(
    planner: Planner, infos: list[ModelInfo], nodes: list[WorkerInfo], why: str
) -> tuple[Placement, Cluster]:
    """The Planner's placement of `infos` on `nodes` and its search state: a full one, or
    after a lost worker the incremental one (module docstring)."""
    max_replicas = None if planner.cfg.replicate else 1
    states: list[Cluster] = []
    t = planner.target
    previous = t.plan.replicas if t is not None else None  # kept where they fit
    spread = why in DEMAND_REASONS

    def full(ns: list[WorkerInfo]) -> Placement:
        plan, state = place_in(
            infos, ns, max_replicas=max_replicas, previous=previous, spread=spread
        )
        states.append(state)
        return plan

    def whole() -> tuple[Placement, Cluster]:
        # without the spawned workers when the others cover every model (spawn.py)
        return planner.spawns.place(nodes, lambda n: n.name, full), states[-1]

    if t is None or t.state is None or why != "workers changed":
        return whole()
    lost = lost_workers(t.state, infos, nodes, planner.spawns.spawned)
    if not lost:
        return whole()
    demand = {m.name: m.demand for m in infos}
    plan, state, incremental = after_loss(t.plan, t.state, lost, demand, whole)
    planner.incremental += incremental
    return plan, state


def lost_workers(
    state: Cluster | None,
    models: Sequence[ModelInfo],
    nodes: Sequence[WorkerInfo],
    spawned: Collection[str] = (),
) -> set[str] | None:
    """The workers `state` placed on that `nodes` lacks, when nothing else `state` was made
    from changed (module docstring); None when the placement must be made afresh."""
    if state is None:
        return None
    names = {n.name for n in nodes}
    lost = set(state.workers) - names
    if not lost or not names - set(state.workers) <= set(spawned):
        return None
    if len(state.chains) != len(models):
        return None
    for m in models:
        old = state.chains.get(m.name)
        if old is None or not same_model(old.info, m):
            return None
    for n in nodes:
        old_w = state.workers.get(n.name)
        if old_w is not None and not same_worker(old_w, n):
            return None
    return lost


def same_model(a: ModelInfo, b: ModelInfo) -> bool:
    """Equal but for the demand (which only weighs the replicas and their load)."""
    return a == replace(b, demand=a.demand)


def same_worker(a: WorkerInfo, b: WorkerInfo) -> bool:
    """The same budgets and refused blocks (what is resident only breaks ties)."""
    return (a.capacity_bytes, a.refused, a.kv_budget_bytes) == (
        b.capacity_bytes,
        b.refused,
        b.kv_budget_bytes,
    )


def uncovered_demand(plan: Placement, demand: Mapping[str, float]) -> float:
    return sum(max(0.0, demand.get(n, 0.0)) for n in plan.uncovered)


def after_loss(
    plan: Placement,
    state: Cluster,
    lost: set[str],
    demand: Mapping[str, float],
    full: Full,
) -> tuple[Placement, Cluster, bool]:
    """(placement, its search state, whether it is the incremental one) after `lost` workers
    are gone: `replace_lost` (which updates `state`), or `full()` when that one leaves a model
    uncovered that `plan` covered and the full one covers more demand."""
    inc = replace_lost(plan, state, lost)
    if set(inc.uncovered) <= set(plan.uncovered):
        return inc, state, True
    whole, whole_state = full()
    if uncovered_demand(whole, demand) < uncovered_demand(inc, demand):
        return whole, whole_state, False
    return inc, state, True
