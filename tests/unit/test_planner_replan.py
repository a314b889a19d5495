"""The Planner after a lost worker: an incremental re-placement (replace_lost) whose commands
touch only what moved, with a full placement only when the incremental one is not acceptable."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from blockllm.broker.planner.config import PlannerConfig
from blockllm.broker.planner.placement import WorkerInfo, place_in, replace_lost
from blockllm.broker.planner.planner import Planner
from blockllm.broker.planner.replan import after_loss, lost_workers
from blockllm.broker.protocol import LoadStage, StatsBody, UnloadStage
from blockllm.client.bench.scale_sim import manifest_of
from blockllm.client.bench.scale_synth import GB, make_tenants, model_infos, zipf_demand
from blockllm.zoo.chain import stage_key
from tests.unit.typed_bodies import stats

Layout = dict[str, list[tuple[str, int, int]]]  # worker -> its stages (model, start, end)


def catalog(n_models: int, seed: int = 1) -> tuple[dict[str, Any], dict[str, float]]:
    tenants = make_tenants(n_models, layers=8, seed=seed)
    manifests = {t.name: manifest_of(t) for t in tenants}
    return manifests, zipf_demand(sorted(manifests), seed=seed)


def planner(manifests: dict[str, Any]) -> Planner:
    cfg = PlannerConfig(settle_s=0.0, unload_delay_s=0.0, catalog_interval_s=0.0, dup_confirm_s=0.0)
    return Planner(cfg, lambda: (manifests, []))


def body(
    manifests: dict[str, Any], layout: Layout, demand: dict[str, float], budget: int
) -> StatsBody:
    """A STATS body: the workers with their stages; a model is covered when its chain is."""
    held = {(m, p) for stages in layout.values() for m, s, e in stages for p in range(s, e)}
    return stats(
        {
            "workers": [
                {
                    "name": w,
                    "memory_budget_bytes": budget,
                    "stages": [
                        {"key": stage_key(manifests[m], s, e), "model": m, "start": s, "end": e}
                        for m, s, e in stages
                    ],
                }
                for w, stages in layout.items()
            ],
            "models": {
                name: {
                    "covered": all((name, p) in held for p in range(len(m.chain))),
                    "token_rate": demand[name],
                }
                for name, m in manifests.items()
            },
        }
    )


def settle(p: Planner, manifests, demand, layout: Layout, budget: int, now: float) -> list:
    """Apply the planner's loads and unloads until it commands nothing more; its commands."""
    seen: list = []
    for step in range(10):
        cmds = p.on_stats(body(manifests, layout, demand, budget), now + step)
        seen += cmds
        if not cmds:
            return seen
        for c in cmds:
            if isinstance(c, LoadStage):
                layout[c.worker].append((c.model, c.start, c.end))
            elif isinstance(c, UnloadStage):
                layout[c.worker] = [
                    st for st in layout[c.worker] if stage_key(manifests[st[0]], *st[1:]) != c.key
                ]
    raise AssertionError("the planner did not settle")


def workers_of(plan, model: str) -> set[str]:
    return {w for r in plan.replicas.get(model, ()) for w, _, _ in r}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("n_models", "n_workers"), [(18, 4), (24, 6)])
def test_a_lost_worker_moves_only_its_replicas_and_equals_a_full_placement(
    n_models: int, n_workers: int
) -> None:
    budget = 8 * GB  # roomy: every placement covers every model
    manifests, demand = catalog(n_models)
    p = planner(manifests)
    layout: Layout = {f"w{i}": [] for i in range(n_workers)}
    settle(p, manifests, demand, layout, budget, 0.0)
    before = p.target
    assert before is not None and not before.plan.uncovered and p.incremental == 0
    lost = max(layout, key=lambda w: len(before.plan.stages[w]))  # the busiest worker
    del layout[lost]
    have = {(w, stage_key(manifests[m], s, e)) for w, sts in layout.items() for m, s, e in sts}

    cmds = settle(p, manifests, demand, layout, budget, 100.0)
    after = p.target
    assert after is not before and p.incremental == 1 and after.workers == frozenset(layout)
    # only what moved: the replicas that did not touch the lost worker are kept as they were
    moved = {n for n in before.plan.replicas if lost in workers_of(before.plan, n)}
    for name, reps in before.plan.replicas.items():
        for r in reps:
            if all(w != lost for w, _, _ in r):
                assert r in after.plan.replicas[name], (name, r)
    landed = {w for n in moved for w in workers_of(after.plan, n)}  # where moved ones went
    changed = {w for w in layout if after.plan.stages[w] != before.plan.stages[w]}
    assert changed <= landed | {w for n in moved for w in workers_of(before.plan, n)}
    loads = {
        (c.worker, stage_key(manifests[c.model], c.start, c.end))
        for c in cmds
        if isinstance(c, LoadStage)
    }
    unloads = {(c.worker, c.key) for c in cmds if isinstance(c, UnloadStage)}
    assert loads, "the lost worker's replicas were placed again"
    assert loads == set(after.stage_keys) - have  # exactly the stages the survivors lacked
    assert {w for w, _ in loads | unloads} <= changed
    # the routes that still resolve went at once (planner/hosted.py), the target's once loaded
    kinds = [type(c).__name__ for c in cmds]
    last = max(i for i, k in enumerate(kinds) if k == "SetRoutes")
    assert last > max(i for i, k in enumerate(kinds) if k == "LoadStage")
    assert cmds[last].routes == after.plan.routes

    # equal to a full placement: a fresh planner placing the same snapshot from scratch
    full = planner(manifests)
    empty = {w: [] for w in layout}
    full.on_stats(body(manifests, empty, demand, budget), 100.0)
    assert full.target is not None and full.incremental == 0
    assert after.plan.uncovered == full.target.plan.uncovered == []
    targets = after.state.targets
    for name in manifests:
        want = min(len(full.target.plan.replicas[name]), targets[name])
        assert len(after.plan.replicas[name]) >= want, name
        assert after.plan.hops(name) == full.target.plan.hops(name), name


def test_incremental_only_when_only_workers_were_lost() -> None:
    _, demand = catalog(12)
    tenants = make_tenants(12, layers=8, seed=1)
    infos = model_infos(tenants, demand)
    nodes = [WorkerInfo(f"w{i}", 8 * GB) for i in range(4)]
    _, state = place_in(infos, nodes)
    assert lost_workers(state, infos, nodes[1:]) == {"w0"}
    assert lost_workers(state, infos, nodes) is None  # nothing lost
    assert lost_workers(state, infos, [*nodes[1:], WorkerInfo("new", 8 * GB)]) is None
    assert lost_workers(state, infos, [*nodes[1:], WorkerInfo("spare0")], ["spare0"]) == {"w0"}
    shrunk = [WorkerInfo(n.name, 4 * GB) for n in nodes[1:]]
    assert lost_workers(state, infos, shrunk) is None  # a budget changed
    hotter = [replace(m, demand=m.demand * 3) for m in infos]
    assert lost_workers(state, hotter, nodes[1:]) == {"w0"}  # demand alone: still incremental
    other = [replace(infos[0], chain=(*infos[0].chain[:-1], "new-head")), *infos[1:]]
    assert lost_workers(state, other, nodes[1:]) is None  # a chain changed
    assert lost_workers(state, infos[1:], nodes[1:]) is None  # a model left
    assert lost_workers(None, infos, nodes[1:]) is None


def test_a_full_placement_when_the_incremental_one_uncovers_a_model_it_need_not() -> None:
    """Tight clusters: where replace_lost leaves a model uncovered that the target covered,
    the full placement is taken if it covers more demand; else the incremental one stays."""
    seen = {"incremental": 0, "full": 0}
    for seed in range(12):
        tenants = make_tenants(14, layers=8, seed=seed)
        demand = zipf_demand([t.name for t in tenants], seed=seed)
        infos = model_infos(tenants, demand)
        nodes = [WorkerInfo(f"w{i}", 1.3 * GB) for i in range(6)]
        for lost in [n.name for n in nodes]:
            plan, state = place_in(infos, nodes)
            survivors = [n for n in nodes if n.name != lost]
            calls = []

            def full(infos=infos, survivors=survivors, calls=calls):
                calls.append(1)
                return place_in(infos, survivors)

            new, _, incremental = after_loss(plan, state, {lost}, demand, full)
            fresh, _ = place_in(infos, survivors)
            left = sum(demand[n] for n in new.uncovered)
            if incremental:
                seen["incremental"] += 1
                # a full placement was tried only for a newly uncovered model, and not better
                assert bool(calls) == (not set(new.uncovered) <= set(plan.uncovered))
                assert not calls or left <= sum(demand[n] for n in fresh.uncovered)
            else:
                seen["full"] += 1
                assert calls and new.replicas == fresh.replicas
                plan, state = place_in(infos, nodes)  # what the incremental one gave
                inc = replace_lost(plan, state, [lost])
                assert left < sum(demand[n] for n in inc.uncovered)
    assert seen["incremental"] > 0 and seen["full"] > 0, seen
