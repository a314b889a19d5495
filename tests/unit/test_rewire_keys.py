"""The planned routes' stage keys kept per model (broker/rewire.py `PlannedKeys`) resolve
exactly as keying every hop's spans on every call did (tests/unit/rewire_reference.py), at
every step of random traces: stages coming, going and draining, SET_ROUTES (some models'
routes unchanged, some changed), SET_CHAIN, tenants leaving and coming back with another
chain, workers leaving."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

from blockllm.broker.broker import Broker
from blockllm.broker.config import BrokerConfig
from blockllm.broker.models import kv_reservation
from blockllm.broker.protocol import (
    PROTOCOL_VERSION,
    PlannedHop,
    PlannedRoute,
    Ready,
    SetRoutes,
    StageRef,
)
from blockllm.broker.rewire import best_planned, planned_score, signature
from blockllm.broker.stage_index import LiveViews
from blockllm.broker.state import ChainView
from blockllm.zoo.chain import stage_key
from tests.unit import rewire_reference as ref
from tests.unit.broker_harness import manifest as base_manifest
from tests.unit.broker_harness import spec

LAYERS = 4
CHAIN = LAYERS + 2
PLANNER = b"planner"


def manifests(n: int) -> dict:
    out = {"base": base_manifest("base")}
    for i in range(1, n):
        out[f"ft{i}"] = base_manifest(f"ft{i}", {1 + i % LAYERS: f"{i:064x}"[::-1]})
    return out


def cut(rng: random.Random) -> list[tuple[int, int]]:
    points = sorted(rng.sample(range(1, CHAIN), rng.randrange(0, 3)))
    edges = [0, *points, CHAIN]
    return list(itertools.pairwise(edges))


def plain_key_of(b: Broker):
    """The model's stage key computed from scratch (no memo), SET_CHAIN's chain included."""
    st = b.state

    def key_of(model: str, start: int, end: int) -> str | None:
        s = st.models.get(model)
        if s is None:
            return None
        m = s.manifest
        if model in st.chains:
            m = ChainView(m, st.chains[model])
        try:
            return stage_key(m, start, end)
        except Exception:
            return None

    return key_of


def kv_need_per_span(b: Broker, req: SimpleNamespace, route: list) -> dict:
    """`RequestFlow.kv_need` with each span's layers counted apart."""
    need: dict = {}
    for hop in route:
        layers = sum(req.spec.decoder_layers_in(a, e) for a, e in hop.spans)
        w = b.workers.get(hop.worker)
        dtypes = w.dtypes() if w is not None else {}
        dtype = next((dtypes[k] for k in hop.stage_keys if dtypes.get(k)), "")
        geometries = w.kv_geometries if w is not None else ()
        nbytes = kv_reservation(req.spec, geometries, dtype, layers, req.max_total_len)
        need[hop.worker] = need.get(hop.worker, 0) + nbytes
    return need


def random_routes(rng: random.Random, names: list[str], workers: list[str]) -> tuple:
    routes = []
    for _ in range(rng.randrange(1, 4)):
        spans = cut(rng)
        hops, i = [], 0
        while i < len(spans):  # a hop runs one or more consecutive spans
            j = rng.randrange(i + 1, len(spans) + 1)
            hops.append(PlannedHop(rng.choice(workers), tuple(spans[i:j])))
            i = j
        routes.append(PlannedRoute(tuple(hops), rng.choice((0.5, 1.0, 2.0))))
    return tuple(routes)


def test_kept_planned_keys_resolve_as_keying_every_call() -> None:
    rng = random.Random(3)
    models = manifests(5)
    names = sorted(models)
    specs = {n: spec(m) for n, m in models.items()}
    b = Broker(BrokerConfig(default_timeout_s=30.0), lambda: dict(specs), stage_key, now=0.0)
    st = b.state
    workers = [f"w{i}" for i in range(6)]
    stages: dict[str, list] = {w: [] for w in workers}

    def ready(w: str) -> None:
        refs = []
        for m, s, e in stages[w]:
            if m in models:
                refs.append(StageRef(stage_key(models[m], s, e), m, s, e))
        msg = Ready(PROTOCOL_VERSION, w, 7, "host", "cpu", tuple(refs), free_slots=8)
        b.handle(w.encode(), msg, (), 0.0)

    def served(w: str) -> None:  # stages of planned hops, so that routes resolve often
        for m in rng.sample(names, 2):
            stages[w] += [(m, s, e) for s, e in cut(rng)]

    for w in workers:
        served(w)
        ready(w)
    plans: dict[str, tuple] = {}
    hits = resolved = 0
    for step in range(400):
        what = rng.random()
        if what < 0.25:  # SET_ROUTES: some models' routes new, the others' as before
            for m in rng.sample(names, 2):
                plans[m] = random_routes(rng, names, [*workers, "gone"])
            routes = {m: tuple(replace(r) for r in rs) for m, rs in plans.items()}  # equal copies
            b.handle(PLANNER, SetRoutes(f"c{step}", routes), (), 0.0)
        elif what < 0.45:
            w = rng.choice(workers)
            if rng.random() < 0.5:
                stages[w] = stages[w][1:]
            served(w)
            ready(w)
        elif what < 0.55:  # a stage drains
            w = b.workers.get(rng.choice(workers).encode())
            if w is not None and w.live_stages():
                w.draining[rng.choice(w.live_stages()).key] = 1e9
        elif what < 0.6:
            b.peer_lost(rng.choice(workers).encode(), 0.0)
        elif what < 0.7:  # SET_CHAIN: another model's chain, or its own
            present = [m for m in names[1:] if m in st.models]
            rng.shuffle(present)
            for m in present[:1]:
                st.set_chain(m, models["base"].chain if rng.random() < 0.5 else ())
        elif what < 0.8:  # a tenant leaves, or comes back with another chain
            m = rng.choice(names[1:])
            if m in specs:
                del specs[m]
            else:
                models[m] = base_manifest(m, {rng.randrange(1, LAYERS + 1): f"{step:064x}"})
                specs[m] = spec(models[m])
            b.reload(float(step))
        else:
            ready(rng.choice(workers))
        key_of = plain_key_of(b)
        by_name = st.names()
        up = {p for p in b.workers if rng.random() < 0.8}
        views = LiveViews(b.workers, lambda p, w, up=up: p in up)
        for m in names:
            planned = st.preferred.get(m)
            if not planned:
                continue
            before = st.planned_keys._kept.get(m)
            keys = st.planned_keys.of(m, planned, st.keys_gen, st.key_of)
            hits += before is not None and before[2] is keys
            running = Counter(
                {
                    signature(h): rng.randrange(3)
                    for r in planned
                    if (h := ref.resolve(m, r, by_name, views, key_of))
                }
            )
            got = best_planned(planned, keys, by_name, views, running)
            assert got == ref.best_planned(m, planned, by_name, views, key_of, running), (step, m)
            resolved += got is not None
            own = b.flow.route(m, views)  # (planned, else the broker's own)
            for hops in (got, own):
                if hops is not None and m in st.models:
                    req = SimpleNamespace(spec=st.models[m], max_total_len=64)
                    assert b.flow.kv_need(req, hops) == kv_need_per_span(b, req, hops)
            for r in planned:
                hops = ref.resolve(m, r, by_name, views, key_of)
                if hops is None:
                    continue
                sig = signature(hops)
                for joining in (0, 1):
                    want = ref.planned_score(
                        m, planned, sig, by_name, views, key_of, running, joining
                    )
                    assert (
                        planned_score(planned, keys, sig, by_name, views, running, joining) == want
                    )
    assert hits > 300 and resolved > 100, (hits, resolved)
