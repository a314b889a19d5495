"""The placement search's shortcuts equal the plain computations on random states: a reach that
does not fit (jumping between the positions where a missing block first appears) equals the
walk over every position, KV arenas, resident and refused blocks included; adding a segment
from C-level maps leaves the state that adding it position by position leaves."""

from __future__ import annotations

import gc
import random

from blockllm.broker.planner import placement
from blockllm.broker.planner.placement import ModelInfo, WorkerInfo
from blockllm.broker.planner.placement_index import Chain, Cluster
from blockllm.client.bench.scale_synth import MB, make_tenants, model_infos, zipf_demand


def walk(cl: Cluster, w: str, c: Chain, start: int) -> tuple[int, int, int]:
    """(end, new bytes, bytes not resident), position by position (the plain reach)."""
    room = cl.room(w)
    held, info = cl.held[w], cl.workers[w]
    kv_room = cl.kv_left(w, c)
    seen: set[str] = set()
    new = churn = layers = 0
    end = start
    for p in range(start, len(c.at)):
        if not info.refused.isdisjoint(c.at[p]):
            break
        extra = [b for b in c.at[p] if b not in held and b not in seen]
        cost = sum(c.nbytes(b) for b in extra)
        kv = 1 if 1 <= p < len(c.at) - 1 and c.at[p][0] in extra else 0
        if new + cost > room or layers + kv > kv_room:
            break
        layers += kv
        seen.update(extra)
        new += cost
        churn += sum(c.nbytes(b) for b in extra if b not in info.resident)
        end = p + 1
    return end, new, churn


def random_cluster(rng: random.Random) -> tuple[list[ModelInfo], list[WorkerInfo]]:
    tenants = make_tenants(rng.randint(4, 14), layers=rng.choice([4, 8]), seed=rng.random())
    models = model_infos(tenants, zipf_demand([t.name for t in tenants], seed=rng.random()))
    if rng.random() < 0.5:  # KV rows (a page per decoder layer placed)
        models = [m.__class__(**{**_fields(m), "kv_row_bytes": 4096}) for m in models]
    if rng.random() < 0.3:
        models[0] = models[0].__class__(**{**_fields(models[0]), "tied": True})
    blocks = sorted({b for m in models for b in m.chain})
    workers = [
        WorkerInfo(
            f"w{i}",
            rng.choice([300, 600, 900, 1500]) * MB,
            frozenset(rng.sample(blocks, rng.randint(0, 6))),
            frozenset(rng.sample(blocks, 1)) if rng.random() < 0.2 else frozenset(),
            rng.choice([0, 0, 3 * 2 * 16 * 4096, 8 * 2 * 16 * 4096]),
        )
        for i in range(rng.randint(2, 6))
    ]
    return models, workers


def _fields(m: ModelInfo) -> dict:
    return {f: getattr(m, f) for f in ModelInfo.__slots__}


def test_reach_equals_the_walk_on_random_states() -> None:
    rng = random.Random(5)
    partial = 0
    for _ in range(150):
        models, workers = random_cluster(rng)
        cl = Cluster(workers, sum(m.demand for m in models))
        for _ in range(rng.randint(0, 12)):  # some segments already placed
            m, w = rng.choice(models), rng.choice(workers).name
            c = cl.chain(m)
            start = rng.randrange(len(c.at))
            end, *_ = walk(cl, w, c, start)
            if end > start:
                cl.add(w, m, start, rng.randint(start + 1, end), m.demand)
        for m in models:
            c = cl.chain(m)
            for w in cl.workers:
                for start in range(len(c.at)):
                    got = cl.reach(w, c, start)
                    assert got == walk(cl, w, c, start), (m.name, w, start)
                    partial += got[0] < len(c.at)
    assert partial > 1000  # the shortcut for segments that do not fit was exercised


def test_add_from_maps_equals_add_position_by_position() -> None:
    rng = random.Random(6)
    for _ in range(60):
        models, workers = random_cluster(rng)
        fast = Cluster(workers, 1.0)
        slow = Cluster(workers, 1.0)
        for _ in range(rng.randint(1, 15)):
            m, w = rng.choice(models), rng.choice(workers).name
            c = fast.chain(m)
            start = rng.randrange(len(c.at))
            end = rng.randint(start + 1, len(c.at))
            if any((m.name, p) in fast.covers[w] for p in range(start, end)):
                continue
            fast.add(w, m, start, end, 0.5)
            slow.chain(m).simple = False  # the per-position path
            slow.add(w, m, start, end, 0.5)
        for attr in ("held", "used", "load", "covers", "holders", "kv_layers", "kv_page"):
            assert getattr(fast, attr) == getattr(slow, attr), attr
        assert fast.by_room == slow.by_room and fast.by_tie == slow.by_tie


def test_place_pauses_the_collector_and_leaves_it_as_it_found_it() -> None:
    models, workers = random_cluster(random.Random(7))
    seen = []
    original = placement._place_nodes

    def spy(*args: object) -> object:
        seen.append(gc.isenabled())
        return original(*args)

    placement._place_nodes = spy
    try:
        for enabled in (True, False):
            gc.enable() if enabled else gc.disable()
            placement.place(models, workers)
            assert gc.isenabled() == enabled
    finally:
        placement._place_nodes = original
        gc.enable()
    assert seen and not any(seen)
