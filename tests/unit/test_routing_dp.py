"""The routing DP (routing.best_route) looks at the states and edges of a position once each,
not at their product, and chooses the same routes as the DP it replaced (every state with every
edge: tests/unit/routing_reference.py), ties included, on random clusters."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from blockllm.broker.routing import WorkerView, best_route
from tests.unit.routing_reference import reference_best_route


@dataclass(frozen=True)
class St:
    key: str
    start: int
    end: int
    dtype: str = ""


def random_cluster(rng: random.Random, chain: int, n_workers: int, dtypes: bool):
    """Edges (start -> [(worker, stage)], workers by repr then stage order) and views with
    loads drawn from a few values (ties), some workers unavailable."""
    views, found = {}, []
    for i in range(n_workers):
        peer = f"w{i:02d}".encode()
        stages = []
        for _ in range(rng.randrange(1, 5)):
            start = rng.randrange(chain)
            end = rng.randrange(start + 1, min(chain, start + rng.choice((1, 3, chain))) + 1)
            dtype = rng.choice(("", "bfloat16", "float32")) if dtypes else ""
            stages.append(St(f"k{start}-{end}", start, end, dtype))
        load = rng.choice((0.0, 0.0, 0.25, 0.5, 0.125 + 0.001 * rng.randrange(3)))
        views[peer] = WorkerView(stages, load, rng.random() > 0.15)
        found += [(peer, s) for s in stages]
    edges: dict[int, list] = {}
    for peer, s in sorted(found, key=lambda e: repr(e[0])):
        edges.setdefault(s.start, []).append((peer, s))
    return edges, views


@pytest.mark.parametrize("dtypes", [False, True])
def test_the_pruned_dp_chooses_the_routes_the_full_one_chose(dtypes: bool) -> None:
    rng = random.Random(3 + dtypes)
    routed = multi = 0
    for _ in range(1500):
        chain = rng.randrange(2, 9)
        edges, views = random_cluster(rng, chain, rng.randrange(1, 9), dtypes)
        got = best_route(chain, edges, views)
        assert got == reference_best_route(chain, edges, views)
        routed += got is not None
        multi += got is not None and len(got) > 1
    assert routed > 300 and multi > 100  # routes found, many of several hops
