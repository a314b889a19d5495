"""Demand-aware, locality-aware placement: a pure function of models, demand and workers.

`place(models, workers)` decides which stages each worker loads and which routes each model's
requests take:
1. **Coverage, hottest chain first.** Models are placed in descending demand. A chain replica
   is cut into as few segments as the workers' free memory allows: at each position the worker
   that reaches farthest (its new blocks still fitting its budget) takes the next segment; ties
   go to the least loaded worker (loads told apart in steps of a third of the mean worker
   load: placement_index.py), then to the one needing the fewest new bytes (it already
   holds shared blocks), then to the one that already holds them in the live cluster (fewer
   loads), then to the one covering the fewest positions so far (cold models spread), then
   by name. So the hottest chain crosses the fewest hops, a block shared by
   several models is held once per worker, and a cold fine-tune lands next to its base.
   Between workers of the same reach, a segment after the first goes to one on the node of
   the previous segment (`WorkerInfo.node`) before the other tie-breaks: a hot chain that
   must be cut stays inside a node when a node has the room (placement_index.py).
2. **Replication in proportion to demand.** Each model gets `round(W * its share of the
   demand)` replicas (at least 1, at most W), placed on workers that do not hold it yet, the
   model with the most demand per replica first, while memory lasts. A block shared by models
   is thereby replicated in proportion to their combined demand.
3. **Stages and routes.** On each worker, the positions a set of models covers with the same
   block form one stage (loaded under a model that owns those blocks), so tenants sharing a
   run of blocks are batched together; each replica becomes one `PlannedRoute`.
A worker never gets a position whose block it reported it cannot get (`WorkerInfo.refused`).
Budgets are never exceeded: a replica that does not fit is not placed (the model is reported
in `uncovered` when not even one fits).
4. **Stickiness.** Given the replicas of the placement it replaces (`previous`: the planner's
   target), each replica that still fits where it is stays there unless the search would cut
   the chain into fewer segments (placement_keep.py): unchanged inputs give the same layout,
   and a demand drift moves only what no longer fits or is no longer wanted. A kept replica
   keeps its worker's load, so drifts could pile hot models on one worker: when the sticky
   placement leaves a worker over (1 + SPREAD = 3) x the mean planned load, it is made again with
   that worker's heaviest replicas (but its heaviest) searched afresh, and that one is taken
   if it lowers the highest load by a tenth without covering less demand or giving a model
   more hops (`spread`; the planner asks for it in re-placements for demand only: replan.py).

The search is indexed (placement_index.py: the same choices as scanning every worker, about
0.5 s of CPU for 2,000 models on 256 workers) and the stages and routes are derived in
placement_layout.py.
`replace_lost` re-places after workers are lost, touching only the replicas that were on them
(milliseconds at that size); `place_in` returns the search state it starts from.
"""

from __future__ import annotations

import gc
import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from blockllm.broker.planner.placement_index import Cluster, Segment, place_replica
from blockllm.broker.planner.placement_keep import Previous, keep_or_find, offers, overloaded
from blockllm.broker.planner.placement_layout import Stage, layout, relayout
from blockllm.broker.protocol import PlannedRoute


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model as placement sees it: the chain it is served with and what each block costs.

    `owners[p]` names the models whose own chain has what p holds (`blocks_at(p)`), any of
    which a worker can load it from (() = just this model's own chain); `compute[p]` is the
    relative work per token at p (default: the block bytes); `demand` is in any unit common
    to all models (tokens/s).
    """

    name: str
    chain: tuple[str, ...]
    block_bytes: tuple[int, ...]
    fingerprint: str = ""
    tied: bool = False
    demand: float = 0.0
    owners: tuple[tuple[str, ...], ...] = ()
    compute: tuple[float, ...] = ()
    kv_row_bytes: int = 0  # one token's K (or V) in one layer, as served (0: not limited)

    def owners_at(self, p: int) -> frozenset[str]:
        return frozenset(self.owners[p]) if self.owners else frozenset({self.name})

    def blocks_at(self, p: int) -> tuple[str, ...]:
        """What position p holds in memory: its block (and, for a tied head, the embedding)."""
        if p == len(self.chain) - 1 and self.tied:
            return (self.chain[p], self.chain[0])
        return (self.chain[p],)

    def nbytes(self, block: str) -> int:
        for b, n in zip(self.chain, self.block_bytes, strict=False):
            if b == block:
                return n
        return 0

    def work(self, p: int) -> float:
        if self.compute:
            return float(self.compute[p])
        return float(self.block_bytes[p]) if self.block_bytes else 1.0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker: the weight bytes it may hold (math.inf: unlimited) and what it holds now."""

    name: str
    capacity_bytes: float = math.inf
    resident: frozenset[str] = frozenset()  # block ids held in the live cluster (stability)
    refused: frozenset[str] = frozenset()  # block ids it cannot get: never placed there
    kv_budget_bytes: int = 0  # its KV arena (0: not limited)
    kv_page_bytes: int = 0  # what a KV page costs there (0: no arena yet: the first stage's)
    node: str = ""  # the machine it runs on (READY's host); "": unknown, a node of its own


@dataclass
class Placement:
    """What `place` decided. `stages[w]`: what worker w loads; `routes[m]`: one planned route
    per replica of m; `bytes_used[w]`: the weight bytes of w's stages."""

    stages: dict[str, list[Stage]] = field(default_factory=dict)
    routes: dict[str, tuple[PlannedRoute, ...]] = field(default_factory=dict)
    replicas: dict[str, list[list[Segment]]] = field(default_factory=dict)
    bytes_used: dict[str, int] = field(default_factory=dict)
    uncovered: list[str] = field(default_factory=list)

    def hops(self, model: str) -> int:
        """Hops of the model's shortest replica (0 when it is not placed)."""
        return min((len(r) for r in self.replicas.get(model, [])), default=0)


def replica_targets(models: Sequence[ModelInfo], n_workers: int) -> dict[str, int]:
    """Replicas per model: round(W * demand share), at least 1 and at most W."""
    total = sum(max(0.0, m.demand) for m in models)
    if total <= 0:
        return {m.name: 1 for m in models}
    return {
        m.name: max(1, min(n_workers, round(n_workers * max(0.0, m.demand) / total)))
        for m in models
    }


def place(
    models: Sequence[ModelInfo],
    workers: Sequence[WorkerInfo],
    *,
    max_replicas: int | None = None,
    previous: Previous | None = None,
) -> Placement:
    """The placement of `models` on `workers` (module docstring); deterministic. With
    `previous` (the replicas of the placement it replaces) replicas stay where they still fit
    (placement_keep.py)."""
    plan, _ = place_in(models, workers, max_replicas=max_replicas, previous=previous)
    return plan


def place_in(
    models: Sequence[ModelInfo],
    workers: Sequence[WorkerInfo],
    *,
    max_replicas: int | None = None,
    previous: Previous | None = None,
    spread: bool = True,
) -> tuple[Placement, Cluster]:
    """`place`, and the search state it ends in (what `replace_lost` re-places from).
    `spread`: with `previous`, bound the load kept replicas pile on a worker (`_spread`).

    Nodes and stickiness never cost coverage: when the placement leaves models uncovered, the
    one without nodes, and then the one without `previous`, are made too and taken if they
    cover more demand (keeping chains inside nodes or replicas where they are packs the
    workers differently: on tight clusters now and then a cold model less).

    The cyclic garbage collector is paused meanwhile: the search makes hundreds of thousands
    of small objects at 2,000 models, and each of its passes would walk them all (and the
    caller's heap) again, for no cycle to free (a third of the CPU at that size)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        plan, c = _place_nodes(models, workers, max_replicas, previous)
        if previous and spread:
            plan, c = _spread(models, workers, max_replicas, previous, plan, c)
        if plan.uncovered and previous:
            fresh = _place_nodes(models, workers, max_replicas, None)
            if _covered(models, fresh[0]) > _covered(models, plan):
                plan, c = fresh
        layout(c, plan)  # of the placement taken only
        return plan, c
    finally:
        if paused:
            gc.enable()


def _spread(
    models: Sequence[ModelInfo],
    workers: Sequence[WorkerInfo],
    max_replicas: int | None,
    previous: Previous,
    plan: Placement,
    c: Cluster,
) -> tuple[Placement, Cluster]:
    """The sticky placement, or, when it leaves a worker over (1 + SPREAD) x the mean planned
    load (kept replicas keep their worker's load: demand drifts can pile hot models on one),
    the one made with that worker's heaviest replicas searched afresh
    (placement_keep.overloaded), if it lowers the highest load by a tenth without covering
    less demand or more hops for a model (`_more_hops`)."""
    heavy = overloaded(c, plan.replicas)
    if not heavy:
        return plan, c
    fewer = {n: [r for r in reps if r not in heavy.get(n, ())] for n, reps in previous.items()}
    again, c2 = _place_nodes(models, workers, max_replicas, fewer)
    better = _peak(c2) < 0.9 * _peak(c) and not _more_hops(plan, again)
    if better and _covered(models, again) >= _covered(models, plan):
        return again, c2
    return plan, c


def _more_hops(plan: Placement, again: Placement) -> bool:
    """Whether some model's replicas cross more hops in `again` (counted over as many of its
    replicas as both have)."""
    for name, reps in again.replicas.items():
        was = plan.replicas.get(name)
        if was:
            n = min(len(was), len(reps))
            if sum(len(r) for r in reps[:n]) > sum(len(r) for r in was[:n]):
                return True
    return False


def _place_nodes(
    models: Sequence[ModelInfo],
    workers: Sequence[WorkerInfo],
    max_replicas: int | None,
    previous: Previous | None,
) -> tuple[Placement, Cluster]:
    plan, c = _place_in(models, workers, max_replicas, previous)
    nodes = {w.node for w in workers}
    if plan.uncovered and len(nodes) > 1 and len(nodes - {""}) < len(workers):
        blind = _place_in(models, [replace(w, node="") for w in workers], max_replicas, previous)
        if _covered(models, blind[0]) > _covered(models, plan):
            return blind
    return plan, c


def _peak(c: Cluster) -> float:
    return max(c.load.values(), default=0.0)


def _covered(models: Sequence[ModelInfo], plan: Placement) -> float:
    return sum(max(0.0, m.demand) for m in models if plan.replicas.get(m.name))


def _place_in(
    models: Sequence[ModelInfo],
    workers: Sequence[WorkerInfo],
    max_replicas: int | None,
    previous: Previous | None = None,
) -> tuple[Placement, Cluster]:
    order = sorted(models, key=lambda m: (-m.demand, m.name))
    total = sum(max(0.0, m.demand) for m in models)
    c = Cluster(workers, total)
    plan = Placement()
    targets = c.targets = capped_targets(models, len(workers), max_replicas)
    offered = offers(previous)
    for m in order:  # coverage, hottest first
        share = m.demand / targets[m.name]
        if offered:
            segs = keep_or_find(c, m, (), offered)
            for w, start, end in segs or ():
                c.add(w, m, start, end, share)
        else:
            segs = place_replica(c, m, share, ())
        if segs is None:
            plan.uncovered.append(m.name)
        else:
            plan.replicas[m.name] = [segs]
    replicate(c, plan, [m for m in order if m.name in plan.replicas], targets, offered)
    return plan, c  # stages and routes: place_in's layout


def replace_lost(plan: Placement, c: Cluster, lost: Iterable[str]) -> Placement:
    """The placement after `lost` workers are gone, re-placing only what moved: the replicas
    that had a segment on a lost worker are dropped (their other segments freed), then the
    models left without a replica are covered again (hottest first, with the models `plan`
    could not cover) and the models below their replica target get replicas (`replicate`),
    with the same search as `place`. Other replicas, and the stages and routes of workers no
    new segment lands on, stay as they are. `c` is the state `place_in` (or an earlier
    `replace_lost`) returned with `plan`; it is updated. Targets stay those of the full
    placement (a worker fewer changes `round(W * share)` by at most one)."""
    gone = set(lost) & set(c.workers)
    affected = sorted({name for w in gone for name, _ in c.covers[w]})
    new = Placement(
        stages=dict(plan.stages),
        routes=dict(plan.routes),
        replicas=dict(plan.replicas),
        bytes_used=dict(plan.bytes_used),
        uncovered=[],
    )
    dirty = set(gone)
    for name in affected:
        m = c.chains[name].info
        share = m.demand / c.targets[name]
        keep = []
        for r in plan.replicas[name]:
            if not any(w in gone for w, _, _ in r):
                keep.append(r)
                continue
            for w, start, end in r:
                if w not in gone:
                    c.remove(w, m, start, end, share)
                    dirty.add(w)
        new.replicas[name] = keep
    for w in sorted(gone):
        c.drop_worker(w)
    retry = [c.chains[n].info for n in plan.uncovered if n in c.chains]
    retry += [c.chains[n].info for n in affected if not new.replicas[n]]
    moved = {m.name for m in retry} | set(affected)
    _cover(c, new, retry, dirty, moved)
    replicate(c, new, [c.chains[n].info for n in sorted(moved) if new.replicas.get(n)], c.targets)
    for n in moved:  # where the moved models are now (where they were is in dirty already)
        dirty.update(w for r in new.replicas.get(n) or () for w, _, _ in r)
    relayout(c, new, dirty, moved)
    return new


def capped_targets(
    models: Sequence[ModelInfo], n_workers: int, max_replicas: int | None
) -> dict[str, int]:
    targets = replica_targets(models, n_workers)
    if max_replicas is not None:
        targets = {k: min(v, max(1, max_replicas)) for k, v in targets.items()}
    return targets


def replicate(
    c: Cluster,
    plan: Placement,
    live: Sequence[ModelInfo],
    targets: Mapping[str, int],
    offered: dict[str, list[list[Segment]]] | None = None,
) -> None:
    """Add replicas up to the targets, the model with the most demand per replica first (ties:
    the greater name), while memory lasts. A heap keyed by (demand per replica, name).
    `offered`: previous replicas to keep where they fit (placement_keep.py)."""
    rank = {name: i for i, name in enumerate(sorted(m.name for m in live))}
    heap = [(-m.demand / len(plan.replicas[m.name]), -rank[m.name], m) for m in live]
    heapq.heapify(heap)
    while heap:
        _, _, m = heapq.heappop(heap)
        reps = plan.replicas[m.name]
        if len(reps) >= targets[m.name]:
            continue
        hosts = {w for r in reps for w, _, _ in r}
        share = m.demand / targets[m.name]
        if offered:
            segs = keep_or_find(c, m, hosts, offered)
            for w, start, end in segs or ():
                c.add(w, m, start, end, share)
        else:
            segs = place_replica(c, m, share, hosts)
        if segs is None:
            continue
        reps.append(segs)
        heapq.heappush(heap, (-m.demand / len(reps), -rank[m.name], m))


def _cover(
    c: Cluster, plan: Placement, todo: list[ModelInfo], dirty: set[str], moved: set[str]
) -> None:
    """Cover `todo` hottest first, as `place` would: to make room, free spare replicas first,
    then the only replica of the coldest model colder than the one being covered (that model
    is then covered again in its turn, or left uncovered)."""
    heap = [(-m.demand, m.name, m) for m in todo]
    heapq.heapify(heap)
    while heap:
        _, _, m = heapq.heappop(heap)
        share = m.demand / c.targets[m.name]
        segs = place_replica(c, m, share, ())
        while segs is None and _drop_extra_replica(c, plan, dirty, moved):
            segs = place_replica(c, m, share, ())
        while segs is None:
            colder = [
                (k.demand, k.name)
                for n in plan.replicas
                for k in (c.chains[n].info,)
                if (-k.demand, k.name) > (-m.demand, m.name)
            ]
            if not colder:
                break
            victim = c.chains[min(colder)[1]].info
            for r in plan.replicas.pop(victim.name):
                _free(c, victim, r, dirty)
            moved.add(victim.name)
            heapq.heappush(heap, (-victim.demand, victim.name, victim))
            segs = place_replica(c, m, share, ())
        if segs is None:
            plan.uncovered.append(m.name)
            plan.replicas.pop(m.name, None)
        else:
            plan.replicas[m.name] = [segs]
            if m.name in plan.uncovered:
                plan.uncovered.remove(m.name)
    plan.uncovered.sort(key=lambda n: (-c.chains[n].info.demand, n))


def _free(c: Cluster, m: ModelInfo, replica: list[Segment], dirty: set[str]) -> None:
    for w, start, end in replica:
        c.remove(w, m, start, end, m.demand / c.targets[m.name])
        dirty.add(w)


def _drop_extra_replica(c: Cluster, plan: Placement, dirty: set[str], moved: set[str]) -> bool:
    """Free the replica the replication loop would have added last (the least demand per
    replica among models with more than one), as `place` covers every model before it
    replicates any; False when no model has a spare replica."""
    spare = [
        (m.demand / len(r), n)
        for n, r in plan.replicas.items()
        if len(r) > 1
        for m in (c.chains[n].info,)
    ]
    if not spare:
        return False
    name = min(spare)[1]
    m = c.chains[name].info
    reps = plan.replicas[name] = list(plan.replicas[name])
    _free(c, m, reps.pop(), dirty)
    moved.add(name)
    return True


def layout_load(
    models: Sequence[ModelInfo],
    routes: Mapping[str, Sequence[PlannedRoute]],
    batch_exponent: float = 0.5,
) -> dict[str, float]:
    """Estimated compute per worker of serving `models`' demand over `routes` (any layout: the
    live one from the stats or a candidate `Placement.routes`); pure, comparable across layouts.

    Each worker runs, per step, every distinct block its routes pass through once, batched over
    the requests of all models that pass it there: a block costs its `work` times the demand
    share through it raised to `batch_exponent` (1: batching saves nothing; on a 2-core CPU 8
    requests cost about 2x one, ~0.35; 0: a batch costs one request). So splitting tenants of a
    shared block over workers costs more than it saves unless it balances the load. A model's
    demand is divided over its routes by weight; a model without routes adds nothing.
    """
    total = sum(max(0.0, m.demand) for m in models) or 1.0
    flow: dict[tuple[str, tuple[str, ...]], float] = {}  # (worker, blocks at p) -> share
    work: dict[tuple[str, tuple[str, ...]], float] = {}
    for m in models:
        rs = routes.get(m.name) or ()
        weights = sum(r.weight for r in rs if r.weight > 0)
        if weights <= 0:
            continue
        for r in rs:
            share = max(0.0, m.demand) / total * max(0.0, r.weight) / weights
            for hop in r.hops:
                for start, end in hop.spans:
                    for p in range(max(0, start), min(end, len(m.chain))):
                        k = (hop.worker, m.blocks_at(p))
                        flow[k] = flow.get(k, 0.0) + share
                        work[k] = max(work.get(k, 0.0), m.work(p))
    loads: dict[str, float] = {}
    for k, f in flow.items():
        loads[k[0]] = loads.get(k[0], 0.0) + work[k] * f**batch_exponent
    return loads


def layout_cost(
    models: Sequence[ModelInfo],
    routes: Mapping[str, Sequence[PlannedRoute]],
    batch_exponent: float = 0.5,
    hop_cost: float = 0.0,
) -> float:
    """What a layout costs per token, in block-work units: the busiest worker's
    `layout_load` (throughput) plus `hop_cost` per hop of the average token (each hop is a
    message through the broker: a fixed time, worth `hop_cost` work units)."""
    busiest = max(layout_load(models, routes, batch_exponent).values(), default=0.0)
    total = sum(max(0.0, m.demand) for m in models) or 1.0
    hops = 0.0
    for m in models:
        rs = [r for r in routes.get(m.name) or () if r.weight > 0]
        weights = sum(r.weight for r in rs)
        if weights > 0:
            mean = sum(len(r.hops) * r.weight for r in rs) / weights
            hops += max(0.0, m.demand) / total * mean
    return busiest + hop_cost * hops


def placement_gain(
    models: Sequence[ModelInfo],
    current: Mapping[str, Sequence[PlannedRoute]],
    candidate: Mapping[str, Sequence[PlannedRoute]],
    batch_exponent: float = 0.5,
    hop_cost: float = 0.0,
) -> float:
    """Relative drop of `layout_cost` going from the `current` routes to the `candidate`
    ones: 0.25 = a quarter cheaper; <= 0: no better. A model the current layout does not
    route makes any candidate that routes it worth it (1.0)."""
    if any(m.name not in current and m.name in candidate for m in models):
        return 1.0
    now = layout_cost(models, current, batch_exponent, hop_cost)
    new = layout_cost(models, candidate, batch_exponent, hop_cost)
    return 0.0 if now <= 0 else 1.0 - new / now
