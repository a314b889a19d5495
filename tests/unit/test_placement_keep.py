"""Stickiness (planner/placement_keep.py): a re-placement keeps the replicas of the layout it
replaces where they still fit; unchanged inputs give the same layout (no command), a demand
drift never covers less demand than the placement without stickiness and moves less."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from blockllm.broker.planner.placement import ModelInfo, Placement, WorkerInfo, place
from blockllm.broker.protocol import LoadStage, UnloadStage
from blockllm.client.bench.scale_sim import manifest_of
from blockllm.client.bench.scale_synth import GB, MB, make_tenants, zipf_demand
from tests.unit.test_placement_index import CASES, cluster, same
from tests.unit.test_planner_replan import Layout, planner, settle


def covered(models: list[ModelInfo], plan: Placement) -> float:
    return sum(m.demand for m in models if plan.replicas.get(m.name))


def stage_moves(a: Placement, b: Placement) -> int:
    """Stages one layout has on a worker and the other has not (a load or an unload each)."""
    return sum(
        len(set(a.stages.get(w, ())) ^ set(b.stages.get(w, ()))) for w in {*a.stages, *b.stages}
    )


def drifted(models: list[ModelInfo], seed: int) -> list[ModelInfo]:
    demand = zipf_demand([m.name for m in models], seed=seed)
    return [replace(m, demand=demand[m.name]) for m in models]


@pytest.mark.parametrize("nodes", [False, True])
@pytest.mark.parametrize(("n_models", "n_workers", "capacity"), CASES)
def test_an_unchanged_replace_gives_the_same_layout(
    n_models: int, n_workers: int, capacity: float, nodes: bool
) -> None:
    """The same inputs and the layout they gave: the same layout back (no command), also
    after a sticky re-placement (a drift) and with every worker's blocks resident."""
    models, workers = cluster(n_models, n_workers, capacity, nodes=nodes)
    plan = place(models, workers)
    same(place(models, workers, previous=plan.replicas), plan)
    moved = drifted(models, seed=99)
    sticky = place(moved, workers, previous=plan.replicas)
    same(place(moved, workers, previous=sticky.replicas), sticky)
    chains = {m.name: m.chain for m in models}
    held = {w: {b for o, s, e in sts for b in chains[o][s:e]} for w, sts in sticky.stages.items()}
    live = [replace(w, resident=frozenset(held[w.name])) for w in workers]
    same(place(moved, live, previous=sticky.replicas), sticky)


CLUSTERS = [(18, 4, 8 * GB), (40, 8, 2 * GB), (30, 6, 700 * MB), (60, 8, 2 * GB), (24, 6, 1.2 * GB)]


@pytest.mark.parametrize(("n_models", "n_workers", "capacity"), CLUSTERS)
def test_a_drift_never_covers_less_and_moves_less(
    n_models: int, n_workers: int, capacity: float
) -> None:
    """Random drifts of the demand: the sticky placement covers at least the demand the plain
    one covers, and over all the drifts loads and unloads fewer stages."""
    sticky_moves = plain_moves = 0
    for seed in range(6):
        models, workers = cluster(n_models, n_workers, capacity, seed=seed)
        before = place(models, workers)
        for k in range(3):
            moved = drifted(models, seed=100 * seed + k)
            sticky = place(moved, workers, previous=before.replicas)
            plain = place(moved, workers)
            assert covered(moved, sticky) >= covered(moved, plain) - 1e-12, (seed, k)
            sticky_moves += stage_moves(before, sticky)
            plain_moves += stage_moves(before, plain)
    assert sticky_moves < plain_moves, (sticky_moves, plain_moves)


def test_a_replica_that_still_fits_stays() -> None:
    """A roomy cluster (every replica fits anywhere): after a drift each model keeps its first
    previous replicas, as many as it still gets; only the others are searched."""
    models, workers = cluster(40, 8, math.inf, seed=2)
    before = place(models, workers)
    moved = drifted(models, seed=7)
    after = place(moved, workers, previous=before.replicas)
    assert not after.uncovered
    kept = 0
    for m in moved:
        old, new = before.replicas[m.name], after.replicas[m.name]
        k = min(len(old), len(new))
        assert new[:k] == old[:k], m.name
        kept += k
    assert kept >= len(moved)


def test_a_split_replica_moves_for_fewer_hops_only() -> None:
    """The hottest chain was cut in two on small workers; with a worker that can hold it
    whole it moves there (one hop less); without that worker it stays split."""
    models, small = cluster(6, 4, 700 * MB, seed=1)  # 8 layers: a chain is ~1 GB
    before = place(models, small)
    hot = max(models, key=lambda m: m.demand).name
    assert len(before.replicas[hot][0]) == 2
    big = [*small, WorkerInfo("big", 2 * GB)]
    after = place(models, big, previous=before.replicas)
    assert after.replicas[hot][0] == [("big", 0, len(models[0].chain))]
    assert place(models, small, previous=before.replicas).replicas == before.replicas


@pytest.mark.timeout(60)
def test_a_tenant_that_arrives_and_leaves_touches_only_where_it_lands() -> None:
    """In the planner: a new tenant is loaded where it lands and nothing else moves; when it
    leaves, the layout is the one before it came."""
    tenants = make_tenants(19, layers=8, seed=4)
    manifests = {t.name: manifest_of(t) for t in tenants[:18]}
    demand = zipf_demand(sorted(manifests), seed=4)
    p = planner(manifests)
    budget = 6 * GB
    layout: Layout = {f"w{i}": [] for i in range(4)}
    settle(p, manifests, demand, layout, budget, 0.0)
    first = p.target
    assert first is not None and not first.plan.uncovered
    new = tenants[18]
    manifests[new.name] = manifest_of(new)
    demand[new.name] = min(demand.values()) / 2
    cmds = settle(p, manifests, demand, layout, budget, 100.0)
    second = p.target
    assert second is not first and new.name in second.plan.replicas
    landed = {w for r in second.plan.replicas[new.name] for w, _, _ in r}
    touched = {c.worker for c in cmds if isinstance(c, (LoadStage, UnloadStage))}
    assert touched and touched <= landed
    for name, reps in first.plan.replicas.items():
        assert second.plan.replicas[name] == reps, name
    del manifests[new.name], demand[new.name]
    for w in layout:  # its own stages go with it (their key needs its manifest)
        layout[w] = [st for st in layout[w] if st[0] != new.name]
    settle(p, manifests, demand, layout, budget, 200.0)
    assert p.target.plan.replicas == first.plan.replicas
    assert p.target.plan.stages == first.plan.stages
