"""The routing DP (routing.best_route) looks at the states and edges of a position once each,
not at their product, and chooses the same routes as the DP it replaced (every state with every
edge: tests/unit/routing_reference.py), ties included, on random clusters; so does its shortcut
when an available worker chains the model alone (routing.best_solo)."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest

from blockllm.broker.routing import WorkerView, best_route, best_solo, solo_routes
from tests.unit.routing_reference import reference_best_route


@dataclass(frozen=True)
class St:
    key: str
    start: int
    end: int
    dtype: str = ""


def edges_of(found: list) -> dict[int, list]:
    """The routing index's edges: each (worker, stage) under its start, workers in name order."""
    edges: dict[int, list] = {}
    for peer, s in sorted(found, key=lambda e: repr(e[0])):
        edges.setdefault(s.start, []).append((peer, s))
    return edges


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
    return edges_of(found), views


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


def cluster_with_replicas(rng: random.Random, chain: int, n_workers: int, dtypes: bool):
    """Some workers chain the whole model (cut in 1-3 stages, some with two ways to do it:
    stages counts that tie or not), the others hold random stages; loads with ties."""
    views, found = {}, []
    for i in range(n_workers):
        peer = f"w{i:02d}".encode()
        stages = []
        if rng.random() < 0.6:
            cuts = sorted(rng.sample(range(1, chain), min(chain - 1, rng.randrange(0, 3))))
            bounds = [0, *cuts, chain]
            stages += [St(f"k{a}-{b}", a, b) for a, b in itertools.pairwise(bounds)]
            if chain > 1 and rng.random() < 0.4:  # another way along the same worker
                a = rng.randrange(chain - 1)
                b = rng.randrange(a + 1, chain + 1)
                stages.append(St(f"k{a}-{b}", a, b))
        for _ in range(rng.randrange(0, 3)):
            a = rng.randrange(chain)
            stages.append(St(f"k{a}-{(b := rng.randrange(a + 1, chain + 1))}", a, b))
        if dtypes:
            stages = [
                St(s.key, s.start, s.end, rng.choice(("", "bfloat16", "float32"))) for s in stages
            ]
        stages = list(dict.fromkeys(stages))
        rng.shuffle(stages)
        load = rng.choice((0.0, 0.25, 0.25, 0.5, 0.125 + 0.001 * rng.randrange(3)))
        views[peer] = WorkerView(stages, load, rng.random() > 0.3)
        found += [(peer, s) for s in stages]
    return edges_of(found), views


@pytest.mark.parametrize("dtypes", [False, True])
def test_a_worker_that_chains_the_model_alone_gets_the_route_the_dp_gives(dtypes: bool) -> None:
    rng = random.Random(17 + dtypes)
    solo = shortcut = 0
    for _ in range(2000):
        chain = rng.randrange(2, 9)
        edges, views = cluster_with_replicas(rng, chain, rng.randrange(1, 10), dtypes)
        want = reference_best_route(chain, edges, views)
        alone = solo_routes(chain, edges)
        got = best_solo(alone, views) if alone else None
        if got is not None:
            shortcut += 1
            assert got == want
        one = alone is not None
        assert (got if got is not None else best_route(chain, edges, views, one)) == want
        solo += bool(alone)
        if alone is not None:  # every listed worker chains the model on its own stages
            for worker, n, hops in alone:
                assert len(hops) == 1 and hops[0].worker == worker and len(hops[0].spans) == n
    assert shortcut > (100 if dtypes else 1000) and solo > shortcut  # answered, not always
