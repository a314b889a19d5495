"""Demand-aware, locality-aware placement: a pure function of models, demand and workers.

`place(models, workers)` decides which stages each worker loads and which routes each model's
requests take:
1. **Coverage, hottest chain first.** Models are placed in descending demand. A chain replica
   is cut into as few segments as the workers' free memory allows: at each position the worker
   that reaches farthest (its new blocks still fitting its budget) takes the next segment; ties
   go to the least loaded worker, then to the one needing the fewest new bytes (it already
   holds shared blocks), then to the one that already holds them in the live cluster (fewer
   loads), then to the one covering the fewest positions so far (cold models spread), then
   by name. So the hottest chain crosses the fewest hops, a block shared by
   several models is held once per worker, and a cold fine-tune lands next to its base.
2. **Replication in proportion to demand.** Each model gets `round(W * its share of the
   demand)` replicas (at least 1, at most W), placed on workers that do not hold it yet, the
   model with the most demand per replica first, while memory lasts. A block shared by models
   is thereby replicated in proportion to their combined demand.
3. **Stages and routes.** On each worker, the positions a set of models covers with the same
   block form one stage (loaded under a model that owns those blocks), so tenants sharing a
   run of blocks are batched together; each replica becomes one `PlannedRoute`.
Budgets are never exceeded: a replica that does not fit is not placed (the model is reported
in `uncovered` when not even one fits).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from blockllm.broker.protocol import PlannedHop, PlannedRoute

Stage = tuple[str, int, int]  # (model to load it from, start, end)
KV_PAGE_TOKENS = 16  # tokens of the first geometry a worker's KV page holds (WorkerConfig)
Segment = tuple[str, int, int]  # (worker, start, end) of one replica of a chain


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
    kv_budget_bytes: int = 0  # its KV arena (0: not limited)
    kv_page_bytes: int = 0  # what a KV page costs there (0: no arena yet: the first stage's)


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


class _Cluster:
    """Placement state: per worker the blocks held, bytes, load, and who covers what."""

    def __init__(self, workers: Sequence[WorkerInfo], total_demand: float) -> None:
        self.workers = {w.name: w for w in workers}
        self.held: dict[str, set[str]] = {w.name: set() for w in workers}
        self.used: dict[str, int] = {w.name: 0 for w in workers}
        self.load: dict[str, float] = {w.name: 0.0 for w in workers}
        # worker -> (model, position) pairs it covers
        self.covers: dict[str, set[tuple[str, int]]] = {w.name: set() for w in workers}
        self.total = total_demand or 1.0
        # KV: decoder layers placed per worker (each needs a page of the arena at least) and
        # the page size (set by the first geometry: worker/kv_cache.py)
        self.kv_layers: dict[str, int] = {w.name: 0 for w in workers}
        self.kv_page: dict[str, int] = {w.name: w.kv_page_bytes for w in workers}

    def kv_pages_left(self, w: str, m: ModelInfo) -> int:
        """Decoder layers of m that w's KV arena can still take (a page each), or a large
        number when not limited; 0 when m's rows do not fit a page there."""
        budget = self.workers[w].kv_budget_bytes
        if budget <= 0 or m.kv_row_bytes <= 0:
            return 1 << 30
        page = self.kv_page[w] or 2 * KV_PAGE_TOKENS * m.kv_row_bytes
        if 2 * m.kv_row_bytes > page:
            return 0
        return budget // page - self.kv_layers[w]

    def new_blocks(self, w: str, m: ModelInfo, start: int, end: int) -> dict[str, int]:
        blocks: dict[str, int] = {}
        for p in range(start, end):
            for b in m.blocks_at(p):
                if b not in self.held[w] and b not in blocks:
                    blocks[b] = m.nbytes(b)
        return blocks

    def reach(self, w: str, m: ModelInfo, start: int) -> tuple[int, int, int]:
        """(farthest end, new bytes, bytes not resident) of a segment of m on w from start."""
        room = self.workers[w].capacity_bytes - self.used[w]
        kv_room = self.kv_pages_left(w, m)
        seen: set[str] = set()
        new = churn = layers = 0
        end = start
        for p in range(start, len(m.chain)):
            extra = [b for b in m.blocks_at(p) if b not in self.held[w] and b not in seen]
            cost = sum(m.nbytes(b) for b in extra)
            kv = 1 if extra and 1 <= p < len(m.chain) - 1 else 0  # a new decoder layer
            if new + cost > room or layers + kv > kv_room:
                break
            layers += kv
            seen.update(extra)
            new += cost
            churn += sum(m.nbytes(b) for b in extra if b not in self.workers[w].resident)
            end = p + 1
        return end, new, churn

    def add(self, w: str, m: ModelInfo, start: int, end: int, share: float) -> None:
        blocks = self.new_blocks(w, m, start, end)
        layers = sum(
            1 for p in range(max(1, start), min(end, len(m.chain) - 1)) if m.chain[p] in blocks
        )
        if layers and m.kv_row_bytes and not self.kv_page[w]:
            self.kv_page[w] = 2 * KV_PAGE_TOKENS * m.kv_row_bytes
        self.kv_layers[w] += layers
        self.held[w].update(blocks)
        self.used[w] += sum(blocks.values())
        total_work = sum(m.work(p) for p in range(len(m.chain))) or 1.0
        self.load[w] += share * sum(m.work(p) for p in range(start, end)) / total_work
        self.covers[w].update((m.name, p) for p in range(start, end))


def _place_replica(
    c: _Cluster, m: ModelInfo, share: float, exclude: set[str]
) -> list[Segment] | None:
    """Cut one replica of m's chain into the fewest segments that fit; None if none fits."""
    segments: list[Segment] = []
    pos = 0
    chain_len = len(m.chain)
    while pos < chain_len:
        best: tuple | None = None
        for w in sorted(c.workers):
            if w in exclude:
                continue
            end, new, churn = c.reach(w, m, pos)
            if end == pos:
                continue
            rank = (-end, round(c.load[w] / c.total, 2), new, churn, len(c.covers[w]), w)
            if best is None or rank < best[0]:
                best = (rank, w, end)
        if best is None:
            return None
        _, w, end = best
        segments.append((w, pos, end))
        exclude = exclude | {w}  # a replica visits a worker once
        pos = end
    for w, start, end in segments:
        c.add(w, m, start, end, share)
    return segments


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
) -> Placement:
    """The placement of `models` on `workers` (module docstring); deterministic."""
    order = sorted(models, key=lambda m: (-m.demand, m.name))
    total = sum(max(0.0, m.demand) for m in models)
    c = _Cluster(workers, total)
    plan = Placement()
    targets = replica_targets(models, len(workers))
    if max_replicas is not None:
        targets = {k: min(v, max(1, max_replicas)) for k, v in targets.items()}
    for m in order:  # coverage, hottest first
        share = m.demand / targets[m.name]
        segs = _place_replica(c, m, share, set())
        if segs is None:
            plan.uncovered.append(m.name)
        else:
            plan.replicas[m.name] = [segs]
    live = {m.name: m for m in order if m.name in plan.replicas}
    while live:  # replication: most demand per replica first
        m = max(live.values(), key=lambda m: (m.demand / len(plan.replicas[m.name]), m.name))
        reps = plan.replicas[m.name]
        if len(reps) >= targets[m.name]:
            del live[m.name]
            continue
        hosts = {w for r in reps for w, _, _ in r}
        segs = _place_replica(c, m, m.demand / targets[m.name], hosts)
        if segs is None:
            del live[m.name]
            continue
        reps.append(segs)
    plan.bytes_used = dict(c.used)
    by_name = {m.name: m for m in models}
    grouped = {w: _stages_of(c, w, by_name) for w in sorted(c.workers)}
    plan.stages = {w: [st for st, _ in runs] for w, runs in grouped.items()}
    plan.routes = {
        name: tuple(_route_of(grouped, name, r) for r in reps)
        for name, reps in plan.replicas.items()
    }
    return plan


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


def _groups(
    c: _Cluster, w: str, models: Mapping[str, ModelInfo], p: int, family: tuple[str, int]
) -> dict[frozenset[str], frozenset[str]]:
    """Models of `family` covering p on w, grouped by what p holds -> who can load it."""
    by_block: dict[tuple[str, ...], set[str]] = {}
    for name, q in c.covers[w]:
        m = models[name]
        if q == p and (m.fingerprint, len(m.chain)) == family:
            by_block.setdefault(m.blocks_at(p), set()).add(name)
    return {
        frozenset(g): frozenset().union(*(models[n].owners_at(p) for n in g))
        for g in by_block.values()
    }


def _stages_of(
    c: _Cluster, w: str, models: Mapping[str, ModelInfo]
) -> list[tuple[Stage, frozenset[str]]]:
    """Maximal runs over which the same group of models persists and one model owns every
    block (so the stage can be loaded under its name), each with the models it serves."""
    families = sorted({(models[n].fingerprint, len(models[n].chain)) for n, _ in c.covers[w]})
    stages: list[tuple[Stage, frozenset[str]]] = []
    for family in families:
        runs: dict[frozenset[str], tuple[int, frozenset[str]]] = {}  # group -> (start, owners)
        for p in range(family[1] + 1):
            here = _groups(c, w, models, p, family) if p < family[1] else {}
            for group, (start, owners) in list(runs.items()):
                still = owners & here.get(group, frozenset())
                if still:
                    runs[group] = (start, still)
                else:
                    stages.append(((min(owners), start, p), group))
                    del runs[group]
            for group, owners in here.items():
                runs.setdefault(group, (p, owners))
    return sorted(stages, key=lambda s: (s[0][1], s[0][2], s[0][0]))


def _route_of(
    grouped: Mapping[str, list[tuple[Stage, frozenset[str]]]], model: str, replica: list[Segment]
) -> PlannedRoute:
    """The planned route of one replica: per segment, the worker's stages serving the model
    inside it, in chain order (they tile the segment: m is in one group per position)."""
    hops = []
    for w, start, end in replica:
        spans = sorted(
            (s, e) for (_, s, e), group in grouped[w] if model in group and start <= s < end
        )
        assert spans and spans[0][0] == start and spans[-1][1] == end, (model, w, spans)
        hops.append(PlannedHop(w, tuple(spans)))
    return PlannedRoute(tuple(hops), 1.0)
