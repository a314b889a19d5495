"""The indexed placement search gives today's placement exactly, and the incremental
re-placement after a lost worker moves only what it must and agrees with a full placement."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest

from blockllm.broker.planner.placement import (
    ModelInfo,
    Placement,
    WorkerInfo,
    place,
    place_in,
    replace_lost,
)
from blockllm.broker.planner.placement_layout import layout
from blockllm.client.bench.scale_synth import (
    GB,
    MB,
    make_tenants,
    make_workers,
    model_infos,
    zipf_demand,
)
from tests.unit.placement_reference import reference_place


def cluster(n_models: int, n_workers: int, capacity: float, seed: int = 0, nodes=True, **kw):
    """Synthetic models and workers, 4 workers a node (`nodes`: each worker knows its node)."""
    tenants = make_tenants(n_models, layers=kw.pop("layers", 8), seed=seed, **kw)
    demand = zipf_demand([t.name for t in tenants], seed=seed)
    workers = make_workers(n_workers, capacity=capacity, per_node=4, nodes=nodes)
    return model_infos(tenants, demand), workers


def same(a: Placement, b: Placement) -> None:
    assert a.uncovered == b.uncovered
    assert a.replicas == b.replicas
    assert a.stages == b.stages
    assert a.routes == b.routes
    assert a.bytes_used == b.bytes_used


CASES = [  # models, workers, capacity: roomy, tight (chains split), too small (uncovered)
    (3, 2, math.inf),
    (18, 4, 8 * GB),
    (18, 4, 1.2 * GB),
    (30, 6, 700 * MB),
    (60, 8, 2 * GB),
    (105, 16, 8 * GB),
    (105, 16, 1.5 * GB),
    (128, 64, 8 * GB),  # over 33 workers: loads in steps of a third of the mean load
    (200, 64, 2 * GB),
]


@pytest.mark.parametrize(("n_models", "n_workers", "capacity"), CASES)
def test_indexed_place_equals_todays(n_models: int, n_workers: int, capacity: float) -> None:
    """Without nodes (each worker a node of its own) and with every worker on one node, the
    placement is the scan's (the reference knows no nodes)."""
    models, workers = cluster(n_models, n_workers, capacity, nodes=False)
    want = reference_place(models, workers)
    same(place(models, workers), want)
    same(place(models, [replace(w, node="one") for w in workers]), want)


def test_indexed_place_equals_todays_with_ties_resident_blocks_and_replica_caps() -> None:
    models, workers = cluster(24, 5, 1.5 * GB, seed=3, nodes=False)
    models[0] = replace(models[0], tied=True)  # a tied head holds the embedding too
    models = [*models, replace(models[1], name="zero", demand=0.0, owners=())]
    # the live cluster: worker 0 holds the hottest model's chain, worker 2 a family's layers
    hot = max(models, key=lambda m: m.demand)
    workers[0] = WorkerInfo(workers[0].name, workers[0].capacity_bytes, frozenset(hot.chain))
    workers[2] = WorkerInfo(workers[2].name, 3 * GB, frozenset(models[4].chain[2:6]))
    for cap in (None, 1, 2):
        same(
            place(models, workers, max_replicas=cap),
            reference_place(models, workers, max_replicas=cap),
        )
    no_demand = [replace(m, demand=0.0) for m in models]
    same(place(no_demand, workers), reference_place(no_demand, workers))


def test_lost_worker_that_held_nothing_changes_nothing() -> None:
    models, workers = cluster(4, 3, math.inf)
    workers.append(WorkerInfo("spare", 0))  # no room: holds nothing
    plan, state = place_in(models, workers)
    assert plan.stages["spare"] == []
    after = replace_lost(plan, state, ["spare"])
    assert after.replicas == plan.replicas and after.routes == plan.routes
    assert "spare" not in after.stages


def budgets_kept(plan: Placement, workers: list[WorkerInfo], models: list[ModelInfo]) -> None:
    """Every worker's stages hold at most its capacity; every route tiles its chain."""
    cap = {w.name: w.capacity_bytes for w in workers}
    sizes = {b: n for m in models for b, n in zip(m.chain, m.block_bytes, strict=True)}
    chains = {m.name: m.chain for m in models}
    for w, stages in plan.stages.items():
        held = {b for owner, s, e in stages for b in chains[owner][s:e]}
        assert sum(sizes[b] for b in held) == plan.bytes_used[w] <= cap[w]
    for name, routes in plan.routes.items():
        for r in routes:
            spans = [sp for hop in r.hops for sp in hop.spans]
            assert spans[0][0] == 0 and spans[-1][1] == len(chains[name])
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


ROOMY = [(18, 4, 8 * GB), (40, 8, 8 * GB), (60, 12, 6 * GB)]  # full placements cover all
TIGHT = [(18, 6, 1.5 * GB), (40, 8, 2 * GB), (12, 5, 1.2 * GB)]  # some models stay uncovered


def incremental_and_full(models, workers, lost):
    plan, state = place_in(models, workers)
    inc = replace_lost(plan, state, [lost])
    survivors = [w for w in workers if w.name != lost]
    full = place(models, survivors)
    assert lost not in inc.stages
    assert all(w != lost for reps in inc.replicas.values() for r in reps for w, _, _ in r)
    budgets_kept(inc, survivors, models)
    # the stages and routes re-derived for the touched workers equal a full re-derivation
    whole = Placement(replicas=inc.replicas, uncovered=inc.uncovered)
    layout(state, whole)
    same(inc, whole)
    return plan, inc, full, state


@pytest.mark.parametrize(("n_models", "n_workers", "capacity"), ROOMY)
def test_replace_lost_on_roomy_clusters_matches_the_full_placement(
    n_models: int, n_workers: int, capacity: float
) -> None:
    models, workers = cluster(n_models, n_workers, capacity, seed=n_workers)
    for lost in [w.name for w in workers]:
        plan, inc, full, state = incremental_and_full(models, workers, lost)
        # only what moved: every replica that did not touch the lost worker is kept as it was
        for name, reps in plan.replicas.items():
            for r in reps:
                if all(w != lost for w, _, _ in r):
                    assert r in inc.replicas[name], (lost, name, r)
        assert inc.uncovered == full.uncovered == []
        for m in models:  # same replicas per model (up to the full placement's targets)
            want = min(len(full.replicas[m.name]), state.targets[m.name])
            assert len(inc.replicas[m.name]) >= want, (lost, m.name)
            assert inc.hops(m.name) == full.hops(m.name), (lost, m.name)


@pytest.mark.parametrize(("n_models", "n_workers", "capacity"), TIGHT)
def test_replace_lost_on_tight_clusters_covers_about_what_the_full_placement_covers(
    n_models: int, n_workers: int, capacity: float
) -> None:
    models, workers = cluster(n_models, n_workers, capacity, seed=n_workers)
    demand = {m.name: m.demand for m in models}
    for lost in [w.name for w in workers]:
        plan, inc, full, _ = incremental_and_full(models, workers, lost)
        covered = sum(demand[n] for n in inc.replicas)
        assert covered >= 0.9 * sum(demand[n] for n in full.replicas), lost
        hottest = max(models, key=lambda m: m.demand).name
        assert hottest in inc.replicas and inc.hops(hottest) <= full.hops(hottest) + 1
        # a replica off the lost worker moved only to make room for a hotter model that had
        # to be placed again (coverage first), or was a spare one
        hit = [
            n for n, reps in plan.replicas.items() if any(w == lost for r in reps for w, *_ in r)
        ]
        hot = max((demand[n] for n in [*hit, *plan.uncovered]), default=0.0)
        for name, reps in plan.replicas.items():
            for r in reps:
                if all(w != lost for w, _, _ in r) and r not in inc.replicas.get(name, []):
                    assert demand[name] < hot or len(reps) > 1, (lost, name)


def test_replace_lost_twice_and_a_chain_that_spans_the_lost_worker() -> None:
    models, workers = cluster(12, 6, 1.2 * GB, seed=1)  # chains ~1.06 GB: often two segments
    plan, state = place_in(models, workers)
    split = next(n for n, reps in plan.replicas.items() if any(len(r) > 1 for r in reps))
    lost = next(w for r in plan.replicas[split] if len(r) > 1 for w, _, _ in r)
    once = replace_lost(plan, state, [lost])
    assert split in once.replicas  # re-placed on the survivors
    second = sorted(w for w in once.stages if once.stages[w])[0]
    twice = replace_lost(once, state, [second])
    survivors = [w for w in workers if w.name not in (lost, second)]
    budgets_kept(twice, survivors, models)
    whole = Placement(replicas=twice.replicas, uncovered=twice.uncovered)
    layout(state, whole)
    same(twice, whole)
    assert set(twice.uncovered) <= set(place(models, survivors).uncovered)
