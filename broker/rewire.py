"""Planner-preferred routes (SET_ROUTES), resolved against what workers host now. Pure.

A `PlannedRoute` names workers and chain spans; the broker turns it into `Hop`s (worker
identity, stage keys) when every hop's worker is live, available in the view it is given, and
advertises the stage key of each span for the model. Among the routes that resolve, the one
with the fewest running requests per unit of weight wins (`(running + 1) / weight`), so
requests spread over replicas in proportion to the weights the planner gave, whatever else the
workers run; workers without credit are not in the views at all.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from blockllm.broker.protocol import PlannedRoute
from blockllm.broker.routing import Hop, WorkerView

KeyOf = Callable[[str, int, int], "str | None"]
Signature = tuple[tuple[Any, tuple[str, ...]], ...]


def signature(hops: Sequence[Hop]) -> Signature:
    """What identifies a route: its (worker, stage keys) hops."""
    return tuple((h.worker, h.stage_keys) for h in hops)


def check_planned(route: PlannedRoute, chain_len: int) -> str | None:
    """Why a planned route cannot cover a chain of `chain_len` positions, or None if it can."""
    if not route.hops:
        return "a route needs at least one hop"
    if not route.weight > 0:
        return f"route weight must be > 0, got {route.weight}"
    pos = 0
    for hop in route.hops:
        if not hop.worker or not hop.spans:
            return "every hop needs a worker and at least one span"
        for start, end in hop.spans:
            if start != pos or end <= start:
                return f"span [{start}, {end}) does not continue the chain at {pos}"
            pos = end
    if pos != chain_len:
        return f"the route ends at position {pos}, the chain has {chain_len}"
    return None


# a planned route's hops with their stage keys: (worker name, the model's key over each span,
# None where it has none, the spans), found once per route (`PlannedKeys`)
Keyed = tuple[tuple[str, tuple["str | None", ...], tuple[Any, ...]], ...]


def keyed(model: str, route: PlannedRoute, key_of: KeyOf) -> Keyed:
    """`route`'s hops with `model`'s stage key over each of their spans."""
    return tuple(
        (hop.worker, tuple(key_of(model, start, end) for start, end in hop.spans), tuple(hop.spans))
        for hop in route.hops
    )


class PlannedKeys:
    """Per model, its planned routes `keyed`: kept while its routes (the same tuple object:
    SET_ROUTES keeps a model's tuple when its routes are equal) and the models' stage keys
    (`keys_gen`: SET_CHAIN, a changed model) stay; `forget` a model that left or arrived (a
    name may come back with other keys). A GENERATE then resolves its planned routes without
    keying every hop's spans again."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[Sequence[PlannedRoute], int, list[Keyed]]] = {}

    def of(
        self, model: str, routes: Sequence[PlannedRoute], keys_gen: int, key_of: KeyOf
    ) -> list[Keyed]:
        hit = self._kept.get(model)
        if hit is None or hit[0] is not routes or hit[1] != keys_gen:
            hit = self._kept[model] = (routes, keys_gen, [keyed(model, r, key_of) for r in routes])
        return hit[2]

    def forget(self, models: set[str]) -> None:
        for model in models:
            self._kept.pop(model, None)


def resolve(
    hops: Keyed, by_name: Mapping[str, Hashable], views: Mapping[Hashable, WorkerView]
) -> list[Hop] | None:
    """The `keyed` hops over `views`, or None when a hop is not hosted or not available."""
    out: list[Hop] = []
    for name, keys, spans in hops:
        peer = by_name.get(name)
        view = views.get(peer) if peer is not None else None
        if view is None or not view.available:
            return None
        hosted = view.hosts()
        for key in keys:
            if key is None or key not in hosted:
                return None
        out.append(Hop(peer, keys, spans))  # type: ignore[arg-type]
    return out


def best_planned(
    routes: Sequence[PlannedRoute],
    keys: Sequence[Keyed],
    by_name: Mapping[str, Hashable],
    views: Mapping[Hashable, WorkerView],
    running: Mapping[Signature, int],
) -> list[Hop] | None:
    """The resolvable planned route with the fewest running requests per weight (ties: the
    first listed); `keys`: the routes `keyed` (`PlannedKeys.of`); `running` counts the
    model's requests on each route signature."""
    best: tuple[float, list[Hop]] | None = None
    for route, hops_keyed in zip(routes, keys, strict=True):
        hops = resolve(hops_keyed, by_name, views)
        if hops is None:
            continue
        score = (running.get(signature(hops), 0) + 1) / route.weight
        if best is None or score < best[0]:
            best = (score, hops)
    return None if best is None else best[1]


def same_route(a: Sequence[Hop] | None, b: Sequence[Hop] | None) -> bool:
    """Whether two routes run the same stages on the same workers."""
    if a is None or b is None:
        return a is b
    return signature(a) == signature(b)


def planned_score(
    routes: Sequence[PlannedRoute],
    keys: Sequence[Keyed],
    sig: Signature,
    by_name: Mapping[str, Hashable],
    views: Mapping[Hashable, WorkerView],
    running: Mapping[Signature, int],
    joining: int,
) -> float | None:
    """Running requests per weight of the planned route whose hops are `sig` once `joining`
    more requests are on it (0 for the route a request already runs on: it is counted in
    `running`); the best such score, or None when no planned route resolves to `sig`.
    `keys`: the routes `keyed`."""
    best: float | None = None
    for route, hops_keyed in zip(routes, keys, strict=True):
        hops = resolve(hops_keyed, by_name, views)
        if hops is not None and signature(hops) == sig:
            score = (running.get(sig, 0) + joining) / route.weight
            best = score if best is None else min(best, score)
    return best
