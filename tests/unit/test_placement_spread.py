"""Sticky placement and balance (planner/placement.py `_spread`, placement_keep.overloaded): a
kept replica keeps its worker's load, so drifts of the demand could pile hot models on one
worker; a re-placement that leaves a worker over (1 + SPREAD) x the mean planned load searches
that worker's heaviest replicas but one afresh (taken when it lowers the highest load by a
tenth, covers as much and gives no model more hops)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

import blockllm.broker.planner.placement_keep as keep
from blockllm.broker.planner.placement import Placement, place_in
from blockllm.broker.planner.placement_index import Cluster
from blockllm.client.bench.scale_synth import GB, make_tenants, make_workers, model_infos


def spread(c: Cluster) -> float:
    """The highest planned load over the mean."""
    return max(c.load.values()) / statistics.mean(c.load.values())


def moved(before: Placement, after: Placement) -> int:
    return sum(
        1 for n, reps in after.replicas.items() for r in reps if r not in before.replicas.get(n, ())
    )


def walk(names: list[str], steps: int, seed: int) -> list[dict[str, float]]:
    """Demand that drifts a little at every step: each model's x lognormal(0, 0.5)."""
    rng = random.Random(seed)
    demand = {n: 1.0 / (k + 1) for k, n in enumerate(names)}
    out = [demand]
    for _ in range(steps):
        demand = {n: d * math.exp(rng.gauss(0, 0.5)) for n, d in demand.items()}
        out.append(demand)
    return out


def drift_run(n_models: int, n_workers: int, steps: int, seed: int) -> tuple[list, list, int, int]:
    """(sticky spreads, fresh spreads, replicas the sticky and the fresh placements moved)."""
    tenants = make_tenants(n_models, seed=seed)
    workers = make_workers(n_workers, capacity=8 * GB)
    sticky_s, fresh_s, sticky_moves, fresh_moves = [], [], 0, 0
    sticky = fresh = None
    for demand in walk([t.name for t in tenants], steps, seed):
        models = model_infos(tenants, demand)
        plan, c = place_in(models, workers, previous=sticky.replicas if sticky else None)
        plain, cf = place_in(models, workers)
        if sticky is not None and fresh is not None:
            sticky_s.append(spread(c))
            fresh_s.append(spread(cf))
            sticky_moves += moved(sticky, plan)
            fresh_moves += moved(fresh, plain)
            assert not plan.uncovered
        sticky, fresh = plan, plain
    return sticky_s, fresh_s, sticky_moves, fresh_moves


@pytest.mark.timeout(120)
def test_a_run_of_drifts_does_not_pile_the_load_on_a_worker() -> None:
    """25 small drifts on 105 models x 16 workers (a run where kept replicas piled: the
    highest load reached 3.85x the mean, 1.25x a fresh placement's on average): the sticky
    placements' highest load stays under 3.5x the mean and within 17% of the fresh
    placements' on average (3.37x, 1.15x), and they move a tenth of the replicas the fresh
    ones move."""
    sticky, fresh, sticky_moves, fresh_moves = drift_run(105, 16, 25, seed=1)
    ratio = statistics.mean(s / f for s, f in zip(sticky, fresh, strict=True))
    assert max(sticky) <= 3.5 and ratio <= 1.17, (max(sticky), ratio)
    assert sticky_moves * 10 <= fresh_moves, (sticky_moves, fresh_moves)


HOT = 4


def hot_ones_on_one() -> tuple[list, list, dict]:
    """Four hot models (a replica each) whose previous replicas are all on w0 (roomy
    workers: 5.9x the mean load there), cold others."""
    tenants = make_tenants(12, seed=3)
    demand = {t.name: (1.0 if i < HOT else 0.01) for i, t in enumerate(tenants)}
    models = model_infos(tenants, demand)
    workers = make_workers(6, capacity=16 * GB)
    w0 = workers[0].name
    previous = {m.name: [[(w0, 0, len(m.chain))]] for m in models[:HOT]}
    return models, workers, previous


def test_an_overloaded_worker_sheds_its_heaviest_kept_replica() -> None:
    models, workers, previous = hot_ones_on_one()
    w0 = workers[0].name
    plan, c = place_in(models, workers, previous=previous)
    on_w0 = [m.name for m in models[:HOT] if [(w0, 0, len(m.chain))] in plan.replicas[m.name]]
    assert len(on_w0) == 2  # two of the four went elsewhere: w0 is back under the bound
    mean = statistics.mean(c.load.values())
    assert c.load[w0] <= (1 + keep.SPREAD) * mean
    kept = sum(r in plan.replicas[n] for n, reps in previous.items() for r in reps)
    assert kept == 2  # the others stayed where they were


@pytest.mark.parametrize("off", ["SPREAD", "spread=False"])
def test_without_the_bound_the_four_stay_piled(off: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the bound is for (the same case, the bound off; the planner asks for it only in
    re-placements for demand: replan.py)."""
    if off == "SPREAD":
        monkeypatch.setattr(keep, "SPREAD", math.inf)
    models, workers, previous = hot_ones_on_one()
    plan, c = place_in(models, workers, previous=previous, spread=off == "SPREAD")
    w0 = workers[0].name
    assert all([(w0, 0, len(m.chain))] in plan.replicas[m.name] for m in models[:HOT])
    assert c.load[w0] > (1 + 2.0) * statistics.mean(c.load.values())
