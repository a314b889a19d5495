"""The planner's coverage index answers what routing every model over every worker's stages
answers (Planner.covered, routing.find_route), with and without one worker's copy of a stage."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from blockllm.broker.planner.config import PlannerConfig
from blockllm.broker.planner.coverage import Coverage
from blockllm.broker.planner.facts import WorkerFacts
from blockllm.broker.planner.planner import Planner
from blockllm.broker.protocol import StageRef
from blockllm.client.bench.scale_sim import manifest_of
from blockllm.client.bench.scale_synth import make_tenants
from blockllm.zoo.chain import stage_key


def snapshot(seed: int) -> tuple[Planner, dict[str, WorkerFacts]]:
    """Random stages of 12 models of 6-block chains (two families) on 5 workers."""
    rng = random.Random(seed)
    manifests = {t.name: manifest_of(t) for t in make_tenants(12, layers=4, owned=1, seed=seed)}
    p = Planner(PlannerConfig(), lambda: (manifests, []))
    p.manifests = manifests
    names = sorted(manifests)
    workers = {}
    for i in range(5):
        stages = {}
        for _ in range(rng.randrange(2, 9)):
            m = manifests[rng.choice(names)]
            start = rng.randrange(0, len(m.chain))
            end = rng.randrange(start + 1, len(m.chain) + 1)
            key = stage_key(m, start, end)
            stages[key] = StageRef(key, m.name, start, end)
        workers[f"w{i}"] = WorkerFacts(f"w{i}", stages, capacity=float("inf"))
    return p, workers


@pytest.mark.parametrize("seed", range(12))
def test_coverage_equals_routing_every_model(seed: int) -> None:
    p, workers = snapshot(seed)
    cov = Coverage(workers, p._key, p.manifests)
    models = sorted(p.manifests)
    covered = [m for m in models if p.covered(m, workers)]
    assert [m for m in models if cov.covers(m)] == covered
    for w in workers.values():
        for key, st in w.stages.items():
            rest = {
                **workers,
                w.name: replace(w, stages={k: v for k, v in w.stages.items() if k != key}),
            }
            for m in models:
                assert cov.covers(m, (w.name, key)) == p.covered(m, rest), (seed, w.name, m)
            users = [m for m in models if p._key(m, st.start, st.end) == key]
            assert cov.users(st.start, st.end, key, models) == users
    assert cov.covers("no such model") is False
