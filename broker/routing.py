"""Placement and routing, pure functions (no sockets, no clock): which stages each worker loads,
and which hops a request of a model takes through the stages workers host.

Chain positions follow docs/internals.md: 0 = embed, 1..L = decoder layers, L+1 = head. A
stage is a run [start, end) of positions; its key is `stage_key(manifest, start, end)`, so a
stage serves every model whose key over that span is the same (shared blocks, batched across
tenants).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

Stage = tuple[str, int, int]  # (model name, start, end)
KeyOf = Callable[[str, int, int], "str | None"]


class ManifestLike(Protocol):
    """What placement reads of a `blockllm.zoo.ModelManifest`."""

    name: str
    chain: tuple[str, ...]
    fingerprint: str

    @property
    def block_bytes(self) -> tuple[int, ...]: ...


class StageLike(Protocol):
    """What routing reads of an advertised stage (`protocol.StageRef`)."""

    key: str
    start: int
    end: int


class Hop(NamedTuple):
    """One hop of a route: a worker and the stages it runs in one step, in chain order."""

    worker: Hashable
    stage_keys: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What routing needs to know of a worker: its stages, its load, whether it may be used."""

    stages: Sequence[StageLike]
    load: float = 0.0
    available: bool = True
    keys: frozenset[str] | None = None  # the stages' keys, when known (else computed)

    def hosts(self) -> frozenset[str] | set[str]:
        return self.keys if self.keys is not None else {s.key for s in self.stages}


# -- static placement --------------------------------------------------------------------------


def static_placement(manifests: Sequence[ManifestLike], n_workers: int) -> list[list[Stage]]:
    """For each of `n_workers` workers, the (model, start, end) stages it should load.

    Models are grouped into families (same fingerprint and chain length); each family's chain
    positions are split into `n_workers` contiguous spans balanced by the bytes of the distinct
    blocks at each position (by their count when sizes are unknown). Within a span, a stage
    boundary falls wherever the grouping of models by block id changes, so a run shared by
    several models is one stage (listed once, under its first model's name) and each
    model-specific run is its own stage. Worker i gets span i of every family.
    """
    if n_workers < 1:
        raise ValueError("n_workers must be >= 1")
    plan: list[list[Stage]] = [[] for _ in range(n_workers)]
    for family in _families(manifests):
        weights = [_position_weight(family, p) for p in range(len(family[0].chain))]
        for worker, (lo, hi) in enumerate(balanced_spans(weights, n_workers)):
            plan[worker].extend(_stages_in_span(family, lo, hi))
    return plan


def _families(manifests: Sequence[ManifestLike]) -> list[list[ManifestLike]]:
    groups: dict[tuple[str, int], list[ManifestLike]] = {}
    for m in sorted(manifests, key=lambda m: m.name):
        groups.setdefault((m.fingerprint, len(m.chain)), []).append(m)
    return list(groups.values())


def _position_weight(family: Sequence[ManifestLike], p: int) -> float:
    """Bytes of the distinct blocks at position p (1 per distinct block when sizes unknown)."""
    sizes: dict[str, float] = {}
    for m in family:
        known = m.block_bytes
        sizes[m.chain[p]] = float(known[p]) if len(known) == len(m.chain) else 1.0
    return sum(sizes.values())


def balanced_spans(weights: Sequence[float], n: int) -> list[tuple[int, int]]:
    """Split positions 0..len-1 into n contiguous [lo, hi) spans minimising the heaviest span.

    Spans are never empty while there are at least n positions; extra workers get (len, len).
    """
    size = len(weights)
    parts = min(n, size)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][i]: the smallest max-span weight splitting the first i positions into k spans
    best = [[inf] * (size + 1) for _ in range(parts + 1)]
    cut = [[0] * (size + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, size + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds = [size]
    for k in range(parts, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    bounds.reverse()
    spans = list(itertools.pairwise(bounds))
    return spans + [(size, size)] * (n - parts)


def _block_at(m: ManifestLike, p: int) -> tuple[str, ...]:
    """What position p computes: its block, and for a tied head also the embedding it reuses."""
    if p == len(m.chain) - 1 and getattr(m, "tie_word_embeddings", False):
        return (m.chain[p], m.chain[0])
    return (m.chain[p],)


def _grouping(family: Sequence[ManifestLike], p: int) -> tuple[tuple[str, ...], ...]:
    """The models of a family grouped by what they compute at position p (canonical order)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for m in family:
        groups.setdefault(_block_at(m, p), []).append(m.name)
    return tuple(sorted(tuple(g) for g in groups.values()))


def _stages_in_span(family: Sequence[ManifestLike], lo: int, hi: int) -> list[Stage]:
    stages: list[Stage] = []
    start = lo
    for p in range(lo, hi + 1):
        if p == hi or (p > start and _grouping(family, p) != _grouping(family, start)):
            if p > start:
                stages.extend((group[0], start, p) for group in _grouping(family, start))
            start = p
    return stages


# -- routing -----------------------------------------------------------------------------------


def find_route(
    model: str,
    chain_len: int,
    workers_view: Mapping[Hashable, WorkerView],
    key_of: KeyOf,
) -> list[Hop] | None:
    """Hops covering positions 0..chain_len-1 of `model` in order, or None when none exists.

    Only stages whose key equals `key_of(model, start, end)` serve the model. The cost is
    lexicographic: fewest hops (staying on one worker), then the lowest summed load of the
    hops' workers, then the fewest stages. Workers with `available=False` are skipped. Ties
    go to the worker that sorts first, so the answer is deterministic.
    """
    if chain_len < 1:
        return None
    return best_route(
        chain_len, _usable_stages(model, chain_len, workers_view, key_of), workers_view
    )


def best_route(
    chain_len: int,
    edges: Mapping[int, Sequence[tuple[Hashable, StageLike]]],
    workers_view: Mapping[Hashable, WorkerView],
    one_dtype: bool = False,
) -> list[Hop] | None:
    """`find_route` over given edges (start position -> [(worker, stage)] serving the model,
    in scan order); only the edges' workers are looked up in `workers_view` (unavailable ones
    skipped), so its cost does not grow with the workers that cannot serve the model.
    `one_dtype`: the caller knows the edges' stages are in one dtype at most (`solo_routes`
    said so by not being None)."""
    if chain_len < 1:
        return None
    if one_dtype:
        return _cheapest(chain_len, workers_view, edges)
    dtypes = {getattr(st, "dtype", "") for found in edges.values() for _w, st in found}
    if len(dtypes - {""}) <= 1:
        return _cheapest(chain_len, workers_view, edges)
    # stages served in several dtypes: a route keeps to one (hidden states are not cast
    # silently between hops); the cheapest over the dtypes (a stage that does not say its
    # dtype joins any)
    routes = []
    for dtype in sorted(dtypes - {""}):
        only = {
            p: [(w, st) for w, st in found if getattr(st, "dtype", "") in (dtype, "")]
            for p, found in edges.items()
        }
        route = _cheapest(chain_len, workers_view, only, with_cost=True)
        if route is not None:
            routes.append(route)
    return min(routes, key=lambda r: r[0])[1] if routes else None


Solo = tuple[tuple[Hashable, int, tuple[Hop, ...]], ...]


def solo_routes(
    chain_len: int, edges: Mapping[int, Sequence[tuple[Hashable, StageLike]]]
) -> Solo | None:
    """The workers whose own stages among `edges` chain the whole model, each with the number
    of stages and the hop `best_route` would give it alone: (worker, stages, (hop,)), workers
    in `repr` order; None when the edges' stages are in several dtypes (`best_route` then
    routes per dtype). What `best_solo` needs, computed once per edges (no loads)."""
    dtypes = {getattr(st, "dtype", "") for found in edges.values() for _w, st in found}
    if len(dtypes - {""}) > 1:
        return None
    own: dict[Hashable, dict[int, list[tuple[Hashable, StageLike]]]] = {}
    for start in sorted(edges):
        for worker, stage in edges[start]:
            own.setdefault(worker, {}).setdefault(start, []).append((worker, stage))
    out = []
    for worker in sorted(own, key=_order):
        view = {worker: WorkerView((), 0.0, True)}
        found = _cheapest(chain_len, view, own[worker], with_cost=True)
        if found is not None:
            ((_hops, _load, n), _), hops = found
            out.append((worker, n, tuple(hops)))
    return tuple(out)


def best_solo(solo: Solo, workers_view: Mapping[Hashable, WorkerView]) -> list[Hop] | None:
    """`best_route` when some available worker chains the whole model alone (None when none
    does: then `best_route` must run). Its route is one hop, which no route of more hops
    beats: the cost is (1, the worker's load, its stages), ties to the worker that sorts
    first, as in `_cheapest` (a one-hop state's cost comes from its own worker's stages
    alone, on the same path the worker alone gives: `solo_routes`)."""
    best: tuple[tuple[float, int], list[Hop]] | None = None
    for worker, n, hops in solo:  # in repr order: the first among equal costs stays
        view = workers_view.get(worker)
        if view is None or not view.available:
            continue
        cost = (0.0 + view.load, n)
        if best is None or cost < best[0]:
            best = (cost, list(hops))
    return None if best is None else best[1]


def _cheapest(
    chain_len: int,
    workers_view: Mapping[Hashable, WorkerView],
    edges: Mapping[int, Sequence[tuple[Hashable, StageLike]]],
    with_cost: bool = False,
) -> Any:
    """The cheapest route over `edges` (find_route's cost), or None; with `with_cost`, as
    ((cost, tie-break), hops). Unavailable workers are skipped as they come up.

    A DP over states (position, last worker), positions in order. A stage of worker w from
    position p continues the state (p, w) (no new hop) or starts a hop from the cheapest state
    at p whose last worker is not w: the first or the second cheapest (ties: the state reached
    first), so a position costs its states plus its edges, not their product. Among equal
    costs the state reached first wins, as in a scan of every state for every edge."""
    loads: dict[Hashable, float | None] = {}  # worker -> its load (None: unavailable)
    Cost = tuple[int, float, int]
    # state -> (cost, previous state, stage); states reached in order: position -> [state]
    best: dict[tuple[int, Any], tuple[Cost, Any, Any]] = {(0, None): ((0, 0.0, 0), None, None)}
    at: dict[int, list[tuple[int, Any]]] = {0: [(0, None)]}
    for pos in range(chain_len):
        states = at.get(pos)
        found = edges.get(pos)
        if not states or not found:
            continue
        # the two cheapest states at pos (the first reached among equal costs); no edge from
        # pos reaches pos, so their costs hold while the edges from pos are looked at
        first = second = None
        for s in states:
            if first is None or best[s][0] < best[first][0]:
                first, second = s, first
            elif second is None or best[s][0] < best[second][0]:
                second = s
        assert first is not None
        first_worker = first[1]
        first_hops, first_load, first_n = best[first][0]
        if second is not None:
            second_hops, second_load, second_n = best[second][0]
        for worker, stage in found:
            load = loads.get(worker, _UNSEEN)
            if load is _UNSEEN:
                view = workers_view.get(worker)
                load = loads[worker] = view.load if view is not None and view.available else None
            if load is None:
                continue
            # a new hop from the cheapest state whose worker is not this one
            if worker != first_worker:
                src: Any = first
                cost: Cost | None = (first_hops + 1, first_load + load, first_n + 1)
            elif second is not None:
                src, cost = second, (second_hops + 1, second_load + load, second_n + 1)
            else:
                src = cost = None
            same = (pos, worker)
            here = best.get(same)
            if here is not None:  # go on on the same worker: no new hop
                (hops, on_load, n) = here[0]
                stay = (hops, on_load, n + 1)
                if cost is None or stay < cost or (stay == cost and _before(states, same, src)):
                    src, cost = same, stay
            if cost is None:
                continue
            state = (stage.end, worker)
            now = best.get(state)
            if now is None:
                at.setdefault(stage.end, []).append(state)
                best[state] = (cost, src, stage)
            elif cost < now[0]:
                best[state] = (cost, src, stage)
    finals = [(best[s][0], _order(s[1]), s) for s in at.get(chain_len, ())]
    if not finals:
        return None
    cost, order, state = min(finals, key=lambda f: (f[0], f[1]))
    hops = _backtrack(best, state)
    return ((cost, order), hops) if with_cost else hops


_UNSEEN: Any = object()


def _before(states: list[tuple[int, Any]], a: tuple[int, Any], b: Any) -> bool:
    """Whether state a was reached before state b at their position (b None: no b)."""
    return b is None or states.index(a) < states.index(b)


def _order(worker: Hashable) -> str:
    return repr(worker)


def _usable_stages(
    model: str,
    chain_len: int,
    workers_view: Mapping[Hashable, WorkerView],
    key_of: KeyOf,
) -> dict[int, list[tuple[Hashable, StageLike]]]:
    """Start position -> [(worker, stage)] of the stages that serve `model`."""
    keys: dict[tuple[int, int], str | None] = {}
    edges: dict[int, list[tuple[Hashable, StageLike]]] = {}
    for worker in sorted(workers_view, key=_order):
        view = workers_view[worker]
        if not view.available:
            continue
        for stage in view.stages:
            if not 0 <= stage.start < stage.end <= chain_len:
                continue
            span = (stage.start, stage.end)
            if span not in keys:
                keys[span] = key_of(model, *span)
            if keys[span] is not None and keys[span] == stage.key:
                edges.setdefault(stage.start, []).append((worker, stage))
    return edges


def _backtrack(best: dict, state: tuple[int, Any]) -> list[Hop]:
    pieces: list[tuple[Hashable, StageLike]] = []
    while best[state][1] is not None:
        _, prev, stage = best[state]
        pieces.append((state[1], stage))
        state = prev
    pieces.reverse()
    hops: list[Hop] = []
    for worker, stage in pieces:
        span = (stage.start, stage.end)
        if hops and hops[-1].worker == worker:
            last = hops[-1]
            hops[-1] = Hop(worker, (*last.stage_keys, stage.key), (*last.spans, span))
        else:
            hops.append(Hop(worker, (stage.key,), (span,)))
    return hops
