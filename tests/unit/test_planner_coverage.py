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


@pytest.mark.parametrize("gone", [0, 3])
@pytest.mark.parametrize("seed", range(12))
def test_coverage_equals_routing_every_model(seed: int, gone: int) -> None:
    """`gone`: models that left the catalog while workers still hold stages loaded under them
    (a family's other models may share those stages' keys)."""
    p, workers = snapshot(seed)
    for name in sorted(p.manifests)[:gone]:
        del p.manifests[name]
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
            # of the stage's family only (its key hashes the family): the same models
            assert cov.users(st.start, st.end, key, models, st.model) == users
            kept = all(p.covered(m, rest) for m in users if m in covered)
            assert cov.still_covered(w.name, key, st.start, st.end, models, st.model) == kept
    assert cov.covers("no such model") is False


def owners_scan(manifests, chain, p, tied) -> tuple[str, ...]:
    """Owners.of before its memo: every catalog model, in name order."""
    out = []
    for name in sorted(manifests):
        own, other_tied = manifests[name].chain, bool(manifests[name].tie_word_embeddings)
        if len(own) != len(chain) or own[p] != chain[p]:
            continue
        head = p == len(chain) - 1 and (tied or other_tied)
        if head and (own[0] != chain[0] or other_tied != tied):
            continue
        out.append(name)
    return tuple(out)


@pytest.mark.parametrize("seed", range(4))
def test_owners_and_block_sizes_from_indexes_equal_the_scans(seed: int) -> None:
    """The memoized owners of a chain's blocks (shared by a family's models) and the indexed
    block sizes (stragglers.py) are what scanning the catalog gives; tied heads included."""
    from blockllm.broker.planner.owners import Owners

    rng = random.Random(seed)
    tenants = make_tenants(30, layers=4, owned=1, seed=seed)
    manifests = {}
    for t in tenants:
        m = manifest_of(t)
        if rng.random() < 0.4:  # a tied head: its lm_head is its embedding
            m = replace(m, tie_word_embeddings=True, chain=(*m.chain[:-1], m.chain[0]))
        manifests[m.name] = m
    owners = Owners()
    for _ in range(2):  # the second pass answers from the memo
        for m in manifests.values():
            for tied in (False, True):
                for p in range(len(m.chain)):
                    got = owners.of(manifests, m.chain, p, tied)
                    assert got == owners_scan(manifests, m.chain, p, tied), (m.name, p, tied)
    for m in manifests.values():
        for b in m.chain:
            first = next(
                int(n)
                for x in manifests.values()
                for c, n in zip(x.chain, x.block_bytes, strict=False)
                if c == b
            )
            assert owners.nbytes(manifests, b) == first
    assert owners.nbytes(manifests, "no such block") == 0
