"""The planned-route resolution as it was before the stage keys were kept per planned route
(broker/rewire.py `PlannedKeys`): every hop's spans keyed on every call. Kept to pin the
cached resolution to it (tests/unit/test_rewire_keys.py)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from blockllm.broker.protocol import PlannedRoute
from blockllm.broker.rewire import KeyOf, Signature, signature
from blockllm.broker.routing import Hop, WorkerView


def resolve(
    model: str,
    route: PlannedRoute,
    by_name: Mapping[str, Hashable],
    views: Mapping[Hashable, WorkerView],
    key_of: KeyOf,
) -> list[Hop] | None:
    hops: list[Hop] = []
    for hop in route.hops:
        peer = by_name.get(hop.worker)
        view = views.get(peer) if peer is not None else None
        if view is None or not view.available:
            return None
        hosted = view.hosts()
        keys = tuple(key_of(model, start, end) for start, end in hop.spans)
        if any(k is None or k not in hosted for k in keys):
            return None
        hops.append(Hop(peer, keys, tuple(hop.spans)))  # type: ignore[arg-type]
    return hops


def best_planned(
    model: str,
    routes: Sequence[PlannedRoute],
    by_name: Mapping[str, Hashable],
    views: Mapping[Hashable, WorkerView],
    key_of: KeyOf,
    running: Mapping[Signature, int],
) -> list[Hop] | None:
    best: tuple[float, list[Hop]] | None = None
    for route in routes:
        hops = resolve(model, route, by_name, views, key_of)
        if hops is None:
            continue
        score = (running.get(signature(hops), 0) + 1) / route.weight
        if best is None or score < best[0]:
            best = (score, hops)
    return None if best is None else best[1]


def planned_score(
    model: str,
    routes: Sequence[PlannedRoute],
    sig: Signature,
    by_name: Mapping[str, Hashable],
    views: Mapping[Hashable, WorkerView],
    key_of: KeyOf,
    running: Mapping[Signature, int],
    joining: int,
) -> float | None:
    best: float | None = None
    for route in routes:
        hops = resolve(model, route, by_name, views, key_of)
        if hops is not None and signature(hops) == sig:
            score = (running.get(sig, 0) + joining) / route.weight
            best = score if best is None else min(best, score)
    return best
