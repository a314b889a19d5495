"""Stickiness: a re-placement keeps the replicas of the layout it replaces where they still fit.

`place(..., previous=...)` (placement.py) runs the same greedy search, in the same order
(coverage hottest first, then replication), but before searching for a model's replica it
offers the model's next previous replica (`previous[model]`, in the order the previous
placement made them): it is taken as it is when every segment still fits its worker (the
worker is still there, not refused any of its blocks, has the room for the blocks it does not
hold yet and the KV pages for their layers, and is not already on the model's other replicas)
and the search would not cut the chain into fewer segments (fewer hops: a stated gain). A
replica that does not fit, or loses to fewer hops, is searched afresh like any other. Only
the replicas the targets still want are offered (a model whose demand fell keeps its first
ones); new replicas, new models and models whose replicas lost their worker are searched.

So unchanged inputs give the same placement back: at every step the state is the one the
previous placement had there, and its replica is offered and fits (an unchanged re-place
sends no command). Under a demand drift a replica moves only when it no longer fits, when
its model needs fewer replicas, or for fewer hops; placement.py's `place_in` takes the
placement without stickiness when that one covers more demand (keeping replicas where they
are packs the workers differently: on a tight cluster a cold model could stay uncovered).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from blockllm.broker.planner.placement_index import Cluster, Segment, find_replica

if TYPE_CHECKING:
    from blockllm.broker.planner.placement import ModelInfo

Previous = Mapping[str, Sequence[Sequence[Segment]]]  # model -> its replicas, in order made
# sticky placements may leave a worker at up to (1 + SPREAD) x the mean planned load
# (`overloaded`; 3x: a fresh placement's peak is about 2-2.5x the mean)
SPREAD = 2.0


def offers(previous: Previous | None) -> dict[str, list[list[Segment]]]:
    """A mutable copy of `previous` that `keep_or_find` consumes."""
    return {n: [list(r) for r in reps] for n, reps in (previous or {}).items()}


def fits(c: Cluster, m: ModelInfo, replica: Sequence[Segment], exclude: Collection[str]) -> bool:
    """Whether `replica` can be added to `c` as it is (module docstring)."""
    ch = c.chain(m)
    pos = 0
    seen: set[str] = set()
    for w, start, end in replica:
        if start != pos or end <= start or w not in c.workers or w in exclude or w in seen:
            return False
        seen.add(w)
        pos = end
    if pos != len(ch.at):
        return False
    for w, start, end in replica:
        blocks = {b for p in range(start, end) for b in ch.at[p]}
        refused = c.workers[w].refused
        if refused and not refused.isdisjoint(blocks):
            return False
        missing = blocks.difference(c.held[w])
        if sum(ch.nbytes(b) for b in missing) > c.room(w):
            return False
        if missing and c._kv_new(ch, w, missing, start, end) > c.kv_left(w, ch):
            return False
    return True


def keep_or_find(
    c: Cluster,
    m: ModelInfo,
    exclude: Collection[str],
    offered: dict[str, list[list[Segment]]],
) -> list[Segment] | None:
    """The segments of m's next replica: its first offered replica that fits (consumed), or
    what the search finds (None: nothing fits). The cluster is not changed."""
    mine = offered.get(m.name)
    for i, r in enumerate(mine or ()):
        if not fits(c, m, r, exclude):
            continue
        del mine[i]
        if len(r) > 1:  # a split replica moves only for fewer hops
            found = find_replica(c, m, exclude)
            if found is not None and len(found) < len(r):
                return found
        return r
    return find_replica(c, m, exclude)


def overloaded(c: Cluster, replicas: Mapping[str, Sequence[Sequence[Segment]]]) -> Previous:
    """The replicas to search afresh so that no worker stays over (1 + SPREAD) x the mean
    planned load: on each such worker, its heaviest replicas but the heaviest one first, until
    the rest is under (the heaviest is searched first, when that worker is still empty, and
    would come back to it: it holds its blocks; the next ones find it loaded)."""
    if not c.workers:
        return {}
    mean = sum(c.load.values()) / len(c.workers)
    limit = (1 + SPREAD) * mean
    hot = {w for w, load in c.load.items() if load > limit}
    if not hot or mean <= 0:
        return {}
    on: dict[str, list[tuple[float, str, int]]] = {w: [] for w in hot}
    for name, reps in replicas.items():
        ch = c.chains.get(name)
        if ch is None:
            continue
        share = ch.info.demand / max(1, c.targets.get(name, 1))
        for i, r in enumerate(reps):
            for w, s, e in r:
                if w in hot:
                    on[w].append((share * sum(ch.work[s:e]) / ch.total_work, name, i))
    out: dict[str, set[int]] = {}
    for w in sorted(hot):
        excess = c.load[w] - limit
        for load, name, i in sorted(on[w], key=lambda x: (-x[0], x[1], x[2]))[1:]:
            if excess <= 0:
                break
            out.setdefault(name, set()).add(i)
            excess -= load
    return {n: [r for i, r in enumerate(replicas[n]) if i in idx] for n, idx in out.items()}
