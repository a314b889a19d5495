"""Today's (pre-index) placement search, kept verbatim as the reference the indexed `place`
must reproduce exactly (tests/unit/test_placement_index.py). Not imported by the package.
Changed in step with the index since: a worker's load ranks in steps of 1/LOAD_STEPS of the
mean worker load (0.01 of the total where that is finer), no longer always 0.01 of the total."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from blockllm.broker.planner.placement import ModelInfo, Placement, WorkerInfo, replica_targets
from blockllm.broker.planner.placement_index import LOAD_STEPS
from blockllm.broker.protocol import PlannedHop, PlannedRoute

Stage = tuple[str, int, int]  # (model to load it from, start, end)
Segment = tuple[str, int, int]  # (worker, start, end) of one replica of a chain


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
        seen: set[str] = set()
        new = churn = 0
        end = start
        for p in range(start, len(m.chain)):
            extra = [b for b in m.blocks_at(p) if b not in self.held[w] and b not in seen]
            cost = sum(m.nbytes(b) for b in extra)
            if new + cost > room:
                break
            seen.update(extra)
            new += cost
            churn += sum(m.nbytes(b) for b in extra if b not in self.workers[w].resident)
            end = p + 1
        return end, new, churn

    def add(self, w: str, m: ModelInfo, start: int, end: int, share: float) -> None:
        blocks = self.new_blocks(w, m, start, end)
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
            load = round(c.load[w] / (c.total / max(100, LOAD_STEPS * len(c.workers))))
            rank = (-end, load, new, churn, len(c.covers[w]), w)
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


def reference_place(
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
