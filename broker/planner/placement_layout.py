"""From the placement search's state to stages and routes: for every worker (`layout`) or only
for the workers whose segments changed and the models passing through them (`relayout`).

On each worker, the positions a set of models covers with the same block form one stage
(loaded under a model that owns those blocks), so tenants sharing a run of blocks are batched
together; each replica becomes one `PlannedRoute` over its workers' stages.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from blockllm.broker.planner.placement_index import Cluster, Segment
from blockllm.broker.protocol import PlannedHop, PlannedRoute

if TYPE_CHECKING:
    from blockllm.broker.planner.placement import Placement

Stage = tuple[str, int, int]  # (model to load it from, start, end)


def layout(c: Cluster, plan: Placement) -> None:
    """Stages of every worker and routes of every replica (and `bytes_used`)."""
    _intern_owners(c)
    c.grouped, c.spans_of = {}, {}
    plan.stages = {}
    for w in sorted(c.workers):
        _restage(c, plan, w)
    plan.bytes_used = dict(c.used)
    plan.routes = {
        name: tuple(_route_of(c.spans_of, name, r) for r in reps)
        for name, reps in plan.replicas.items()
    }


def relayout(c: Cluster, plan: Placement, workers: Iterable[str], models: Iterable[str]) -> None:
    """Re-derive the stages of `workers` (whose segments changed; gone ones are dropped) and
    the routes of `models` and of every model with a stage on those workers."""
    _intern_owners(c)
    moved = set(models)
    for w in sorted(set(workers)):
        if w not in c.workers:
            for d in (plan.stages, plan.bytes_used, c.grouped, c.spans_of):
                d.pop(w, None)
            continue
        moved.update(c.spans_of.get(w, ()))  # who was routed through w before
        _restage(c, plan, w)
        moved.update(c.spans_of[w])
        plan.bytes_used[w] = c.used[w]
    for name in sorted(moved):
        reps = plan.replicas.get(name)
        if reps:
            plan.routes[name] = tuple(_route_of(c.spans_of, name, r) for r in reps)
        else:
            plan.routes.pop(name, None)


def _intern_owners(c: Cluster) -> None:
    """Owners per position of every chain: one frozenset per distinct tuple of owners."""
    interned: dict[tuple[str, ...], frozenset[str]] = {}
    by_id: dict[int, frozenset[str]] = {}  # the same tuple object: no hash of its names
    for ch in c.chains.values():
        if ch.owners is None and ch.info.owners:
            # o lives as long as c.chains holds its model: its id names it meanwhile
            got = list(map(by_id.get, map(id, ch.info.owners)))
            for i, f in enumerate(got):
                if f is None:
                    o = ch.info.owners[i]
                    f = interned.get(o)
                    if f is None:
                        f = interned[o] = frozenset(o)
                    got[i] = by_id[id(o)] = f
            ch.owners = got


def _restage(c: Cluster, plan: Placement, w: str) -> None:
    runs = c.grouped[w] = _stages_of(c, w)
    plan.stages[w] = [st for st, _ in runs]
    mine: dict[str, list[tuple[int, int]]] = {}
    for (_, s, e), group in runs:
        for name in group:
            mine.setdefault(name, []).append((s, e))
    for spans in mine.values():
        spans.sort()
    c.spans_of[w] = mine


def _stages_of(c: Cluster, w: str) -> list[tuple[Stage, frozenset[str]]]:
    """Maximal runs over which the same group of models persists and one model owns every
    block (so the stage can be loaded under its name), each with the models it serves."""
    at: dict[tuple[str, int], list[dict[tuple[str, ...], set[str]]]] = {}
    last = None
    owned: dict[str, list[frozenset[str]]] = {}  # model -> owners per position
    for name, p in c.covers[w]:  # family -> position -> what p holds -> models
        if name != last:  # a segment's positions come one after the other
            last, ch = name, c.chains[name]
            owned[name] = ch.owners_per_position()
            key = (ch.info.fingerprint, len(ch.at))
            fam = at.get(key)
            if fam is None:
                fam = at[key] = [{} for _ in range(len(ch.at) + 1)]
        models = fam[p].get(ch.at[p])
        if models is None:
            fam[p][ch.at[p]] = {name}
        else:
            models.add(name)
    stages: list[tuple[Stage, frozenset[str]]] = []
    for family in sorted(at):
        runs: dict[frozenset[str], tuple[int, frozenset[str]]] = {}  # group -> (start, owners)
        for p in range(family[1] + 1):
            here = {}
            for g in at[family][p].values():
                each = {owned[n][p] for n in g}
                here[frozenset(g)] = each.pop() if len(each) == 1 else frozenset().union(*each)
            for group, (start, owners) in list(runs.items()):
                now = here.get(group)
                still = owners if now is owners else owners & (now or frozenset())
                if still:
                    runs[group] = (start, still)
                else:
                    stages.append(((min(owners), start, p), group))
                    del runs[group]
            for group, owners in here.items():
                runs.setdefault(group, (p, owners))
    return sorted(stages, key=lambda s: (s[0][1], s[0][2], s[0][0]))


def _route_of(
    spans_of: Mapping[str, Mapping[str, list[tuple[int, int]]]], model: str, replica: list[Segment]
) -> PlannedRoute:
    """The planned route of one replica: per segment, the worker's stages serving the model
    inside it, in chain order (they tile the segment: m is in one group per position).
    `spans_of[w][m]`: the spans of w's stages serving m, sorted."""
    hops = []
    for w, start, end in replica:
        mine = spans_of[w].get(model, [])  # sorted, disjoint: those starting in the segment
        spans = mine[bisect.bisect_left(mine, (start,)) : bisect.bisect_left(mine, (end,))]
        assert spans and spans[0][0] == start and spans[-1][1] == end, (model, w, spans)
        hops.append(PlannedHop(w, tuple(spans)))
    return PlannedRoute(tuple(hops), 1.0)
