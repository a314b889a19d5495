"""The routing DP as it was before the pruned one (broker/routing.py `_cheapest`): every state
at a position tried with every edge there. Kept to pin the pruned DP's routes to it
(tests/unit/test_routing_dp.py)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from blockllm.broker.routing import Hop, StageLike, WorkerView, _backtrack


def reference_best_route(
    chain_len: int,
    edges: Mapping[int, Sequence[tuple[Hashable, StageLike]]],
    workers_view: Mapping[Hashable, WorkerView],
) -> list[Hop] | None:
    """`find_route` over given edges (start position -> [(worker, stage)] serving the model,
    in scan order); only the edges' workers are looked up in `workers_view` (unavailable ones
    skipped), so its cost does not grow with the workers that cannot serve the model."""
    if chain_len < 1:
        return None
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


def _cheapest(
    chain_len: int,
    workers_view: Mapping[Hashable, WorkerView],
    edges: Mapping[int, Sequence[tuple[Hashable, StageLike]]],
    with_cost: bool = False,
) -> Any:
    """The cheapest route over `edges` (find_route's cost), or None; with `with_cost`, as
    ((cost, tie-break), hops). Unavailable workers are skipped as they come up."""
    usable: dict[Hashable, bool] = {}
    # DAG over (position, last worker): positions only increase, so one pass in order
    Cost = tuple[int, float, int]
    best: dict[tuple[int, Any], tuple[Cost, Any, Any]] = {(0, None): ((0, 0.0, 0), None, None)}
    at: dict[int, list[tuple[int, Any]]] = {0: [(0, None)]}  # position -> states, as inserted
    for pos in range(chain_len):
        states = [(s, best[s]) for s in at.get(pos, ())]
        for (_, last), ((hops, load, n), _, _) in states:
            for worker, stage in edges.get(pos, ()):
                ok = usable.get(worker)
                if ok is None:
                    view = workers_view.get(worker)
                    ok = usable[worker] = view is not None and view.available
                if not ok:
                    continue
                new_hop = worker != last
                cost = (
                    hops + new_hop,
                    load + (workers_view[worker].load if new_hop else 0.0),
                    n + 1,
                )
                state = (stage.end, worker)
                if state not in best:
                    at.setdefault(stage.end, []).append(state)
                    best[state] = (cost, (pos, last), stage)
                elif cost < best[state][0]:
                    best[state] = (cost, (pos, last), stage)
    finals = [(best[s][0], _order(s[1]), s) for s in at.get(chain_len, ())]
    if not finals:
        return None
    cost, order, state = min(finals, key=lambda f: (f[0], f[1]))
    hops = _backtrack(best, state)
    return ((cost, order), hops) if with_cost else hops


def _order(worker: Hashable) -> str:
    return repr(worker)
