"""The broker's routing index: the routes it finds are the scan's (routing.find_route over every
worker), it stays fresh when stages, drains, workers and models change, and a route lookup
looks only at the workers that host a stage of the model (not at every worker)."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

from blockllm.broker.broker import Broker
from blockllm.broker.config import BrokerConfig
from blockllm.broker.protocol import PROTOCOL_VERSION, Heartbeat, Ready, StageRef
from blockllm.broker.routing import WorkerView, _usable_stages, find_route
from blockllm.broker.stage_index import LiveViews
from blockllm.zoo.chain import stage_key
from tests.unit.broker_harness import manifest as base_manifest
from tests.unit.broker_harness import spec

LAYERS = 4
CHAIN = LAYERS + 2


def manifests(n: int) -> dict:
    out = {"base": base_manifest("base")}
    for i in range(1, n):
        out[f"ft{i}"] = base_manifest(f"ft{i}", {1 + i % LAYERS: f"{i:064x}"[::-1]})
    return out


def broker_with(models: dict) -> Broker:
    specs = {n: spec(m) for n, m in models.items()}
    return Broker(BrokerConfig(default_timeout_s=30.0), lambda: specs, stage_key, now=0.0)


def ready(b: Broker, models: dict, name: str, stages: list[tuple[str, int, int]]) -> None:
    refs = tuple(StageRef(stage_key(models[m], s, e), m, s, e) for m, s, e in stages)
    msg = Ready(PROTOCOL_VERSION, name, 7, "host", "cpu", refs, free_slots=8)
    b.handle(name.encode(), msg, (), 0.0)


def scan_route(b: Broker, model: str, available=lambda p, w: True):
    views = {
        p: WorkerView(w.live_stages(), w.load(), available(p, w)) for p, w in b.workers.items()
    }
    return find_route(model, CHAIN, views, b.state.key_of)


def random_stages(rng: random.Random, names: list[str]) -> list[tuple[str, int, int]]:
    out = []
    for _ in range(rng.randrange(1, 4)):
        start = rng.randrange(0, CHAIN - 1)
        out.append((rng.choice(names), start, rng.randrange(start + 1, CHAIN + 1)))
    return out


def test_indexed_routes_equal_the_scan_while_the_cluster_changes() -> None:
    rng = random.Random(5)
    models = manifests(6)
    names = sorted(models)
    b = broker_with(models)
    for i in range(12):
        ready(b, models, f"w{i:02d}", random_stages(rng, names))
    for round_ in range(40):
        what = rng.randrange(5)
        peer = rng.choice(sorted(b.workers))
        if what == 0:  # a worker re-registers with other stages
            ready(b, models, peer.decode(), random_stages(rng, names))
        elif what == 4:  # ... with the same stages in another order, one more or one less
            stages = [(s.model, s.start, s.end) for s in b.workers[peer].stages]
            rng.shuffle(stages)
            if stages and rng.random() < 0.5:
                stages.pop(rng.randrange(len(stages)))
            else:
                stages += random_stages(rng, names)[:1]
            ready(b, models, peer.decode(), stages)
        elif what == 1 and b.workers[peer].stages:  # a stage starts draining
            b.workers[peer].draining[b.workers[peer].stages[0].key] = 1e9
        elif what == 2:  # a worker is lost
            b.peer_lost(peer, 0.0)
        else:  # a new worker
            ready(b, models, f"x{round_:02d}", random_stages(rng, names))
        for p in sorted(b.workers):  # loads: some equal (ties), some not
            queued = {"q": rng.choice((0, 0, 3, 7))}
            b.handle(p, Heartbeat(free_slots=8, queue_depths=queued), (), 0.0)
        busy = {p for p in b.workers if rng.random() < 0.3}
        for model in names:
            assert b.flow.route(model, LiveViews(b.workers, lambda p, w: True)) == scan_route(
                b, model
            )
            avail = lambda p, w, busy=busy: p not in busy  # noqa: E731
            assert b.flow.route(model, LiveViews(b.workers, avail)) == scan_route(b, model, avail)
            assert b.flow.covered(model) == (scan_route(b, model) is not None)


def test_a_changed_chain_or_catalog_changes_the_routes() -> None:
    models = manifests(2)
    b = broker_with(models)
    ready(b, models, "w0", [("base", 0, CHAIN)])
    assert b.flow.covered("base") and not b.flow.covered("ft1")
    # SET_CHAIN: ft1 served with the base's blocks -> the base's stage serves it
    b.state.set_chain("ft1", models["base"].chain)
    assert b.flow.covered("ft1")
    b.state.set_chain("ft1", ())
    assert not b.flow.covered("ft1")
    # the zoo's ft1 becomes the base's chain (a reload): routed over the base's stage
    specs = {"base": spec(models["base"]), "ft1": spec(replace(models["base"], name="ft1"))}
    b.state.catalog = lambda: specs
    b.reload(1.0)
    assert b.flow.covered("ft1")


def test_a_route_looks_only_at_the_workers_hosting_the_model() -> None:
    models = manifests(3)
    b = broker_with(models)
    ready(b, models, "host", [("ft1", 0, CHAIN)])
    for i in range(300):  # other tenants' workers
        ready(b, models, f"other{i:03d}", [("ft2", 0, CHAIN)])
    looked: list = []

    def available(peer, w) -> bool:
        looked.append(peer)
        return True

    hops = b.flow.route("ft1", LiveViews(b.workers, available))
    assert hops is not None and [h.worker for h in hops] == [b"host"]
    assert looked == [b"host"]


def test_stages_that_go_are_taken_out_of_the_cached_routes_as_a_rebuild_would() -> None:
    """Workers that chain a model alone (cut in 1-3 stages) and others; stages start and stop
    draining and workers re-register with one stage less, while routes are cached (edges and
    solo routes): every route equals the scan's after every change."""
    rng = random.Random(9)
    models = manifests(4)
    names = sorted(models)
    b = broker_with(models)

    def chained(model: str) -> list[tuple[str, int, int]]:
        cuts = sorted(rng.sample(range(1, CHAIN), rng.randrange(0, 3)))
        bounds = [0, *cuts, CHAIN]
        return [(model, a, z) for a, z in itertools.pairwise(bounds)]

    for i in range(10):
        stages = chained(rng.choice(names)) if i % 3 else []
        ready(b, models, f"w{i:02d}", stages + random_stages(rng, names)[: rng.randrange(2)])
    for _ in range(150):
        peer = rng.choice(sorted(b.workers))
        w = b.workers[peer]
        what = rng.random()
        if what < 0.4 and w.live_stages():  # a stage starts draining
            w.draining[rng.choice(w.live_stages()).key] = 1e9
        elif what < 0.55 and w.draining:  # a drain ends (the stage was loaded again)
            del w.draining[rng.choice(sorted(w.draining))]
        elif what < 0.8 and w.stages:  # re-registers with one stage less
            stages = [(s.model, s.start, s.end) for s in w.stages]
            stages.pop(rng.randrange(len(stages)))
            ready(b, models, peer.decode(), stages)
        else:
            ready(b, models, peer.decode(), chained(rng.choice(names)))
        for p in sorted(b.workers):
            queued = {"q": rng.choice((0, 0, 3))}
            b.handle(p, Heartbeat(free_slots=8, queue_depths=queued), (), 0.0)
        busy = {p for p in b.workers if rng.random() < 0.2}
        for model in names:
            avail = lambda p, w, busy=busy: p not in busy  # noqa: E731
            assert b.flow.route(model, LiveViews(b.workers, avail)) == scan_route(b, model, avail)
            assert b.flow.covered(model) == (scan_route(b, model) is not None)


def plain_edges(b: Broker, model: str) -> dict:
    """The model's edges computed plainly: a scan of every worker's live stages
    (routing._usable_stages), kept when on some chain to the end; each start's stages in
    worker order, each as what routes read of it (a re-READY of the same key under another
    model of the family keeps the indexed stage; the order of one worker's stages changes no
    route)."""
    views = {p: WorkerView(w.live_stages(), 0.0, True) for p, w in b.workers.items()}
    found = _usable_stages(model, CHAIN, views, b.state.key_of)
    live, out = {CHAIN}, {}
    for start in sorted(found, reverse=True):
        kept = [(p, s) for p, s in found[start] if s.end in live]
        if kept:
            live.add(start)
            out[start] = sorted(set(normal(kept)))  # (a stage listed twice: once)
    return out


def normal(pairs: list) -> list:
    return [(repr(p), getattr(s, "dtype", ""), s.key, s.start, s.end) for p, s in pairs]


def indexed_edges(b: Broker, model: str) -> dict:
    st = b.state
    edges = st.stage_index.edges(model, CHAIN, b.workers, st.keys_gen, st.key_of)
    for found in edges.values():  # in worker order
        assert [e[:2] for e in normal(found)] == sorted(e[:2] for e in normal(found))
    return {start: sorted(normal(found)) for start, found in edges.items()}


def test_cached_edges_equal_a_scan_while_stages_come_go_and_drain() -> None:
    """Stages come, go and drain, workers come and go, a chain is set, while models are routed
    at random times (so some have cached edges and some do not): at every step the edges of
    models, kept across the change or built again, equal a plain scan of every worker, and
    whether the model is coverable equals whether the scan finds a route."""
    rng = random.Random(11)
    models = manifests(6)
    names = sorted(models)
    b = broker_with(models)
    st = b.state
    for i in range(10):
        ready(b, models, f"w{i:02d}", random_stages(rng, names))
    index = st.stage_index
    kept = 0  # edges checked that were cached before the step's change (kept across it)
    for round_ in range(300):
        before = {m: index._edges.get(m) for m in names}
        peer = rng.choice(sorted(b.workers))
        w = b.workers[peer]
        what = rng.random()
        if what < 0.25 and w.live_stages():
            w.draining[rng.choice(w.live_stages()).key] = 1e9
        elif what < 0.35 and w.draining:
            del w.draining[rng.choice(sorted(w.draining))]
        elif what < 0.55 and w.stages:
            stages = [(s.model, s.start, s.end) for s in w.stages]
            stages.pop(rng.randrange(len(stages)))
            ready(b, models, peer.decode(), stages + random_stages(rng, names)[:1])
        elif what < 0.62:
            b.peer_lost(peer, 0.0)
        elif what < 0.65:  # SET_CHAIN: new stage keys for every model
            st.set_chain("ft1", models["base"].chain if rng.random() < 0.5 else ())
        elif what < 0.72:  # a stage of a model the broker does not know, with a known key
            m, start, end = random_stages(rng, names)[0]
            ghost = StageRef(stage_key(models[m], start, end), "ghost", start, end)
            msg = Ready(
                PROTOCOL_VERSION, f"g{round_:03d}", 7, "host", "cpu", (ghost,), free_slots=8
            )
            b.handle(f"g{round_:03d}".encode(), msg, (), 0.0)
        else:
            ready(b, models, f"x{round_:03d}", random_stages(rng, names))
        for model in rng.sample(names, 2):  # routed: its edges cached
            b.flow.route(model, LiveViews(b.workers, lambda p, w: True))
        for model in rng.sample(names, 4):  # cached edges (some kept across changes)
            index.edges(model, CHAIN, b.workers, st.keys_gen, st.key_of)  # (fresh first)
            kept += before[model] is not None and index._edges.get(model) is before[model]
            assert indexed_edges(b, model) == plain_edges(b, model), (round_, model)
            ok = index.coverable(model, CHAIN, b.workers, st.keys_gen, st.key_of)
            assert ok == (scan_route(b, model) is not None), (round_, model)
    assert kept > 100, kept


def test_a_stage_of_an_unknown_model_over_a_new_span_reaches_the_cached_routes() -> None:
    """A stage the catalog does not know yet (its model unknown: its spans are every model's)
    over a span no stage advertised before completes a chain whose edges were cached."""
    models = manifests(2)
    b = broker_with(models)
    ready(b, models, "w0", [("base", 0, 3)])
    assert not b.flow.covered("base")  # (edges cached: not coverable)
    ghost = StageRef(stage_key(models["base"], 3, CHAIN), "ghost", 3, CHAIN)
    b.handle(b"g", Ready(PROTOCOL_VERSION, "g", 7, "host", "cpu", (ghost,), free_slots=8), (), 0.0)
    assert b.flow.covered("base") and scan_route(b, "base") is not None
    assert b.flow.route("base", LiveViews(b.workers, lambda p, w: True)) == scan_route(b, "base")


def test_a_tenant_leaving_keeps_the_other_models_cached_edges() -> None:
    models = manifests(3)
    b = broker_with(models)
    st = b.state
    ready(b, models, "w0", [("base", 0, CHAIN), ("ft1", 0, 2), ("ft2", 0, CHAIN)])
    ready(b, models, "w1", [("ft1", 2, CHAIN)])
    index = st.stage_index
    before = {m: index.edges(m, CHAIN, b.workers, st.keys_gen, st.key_of) for m in models}
    specs = {n: spec(models[n]) for n in ("base", "ft1")}  # ft2 leaves the catalog
    st.catalog = lambda: specs
    b.reload(1.0)
    for m in ("base", "ft1"):
        assert index.edges(m, CHAIN, b.workers, st.keys_gen, st.key_of) is before[m]  # kept
        assert b.flow.route(m, LiveViews(b.workers, lambda p, w: True)) == scan_route(b, m)
        assert indexed_edges(b, m) == plain_edges(b, m)
    assert b.flow.route("ft2", LiveViews(b.workers, lambda p, w: True)) is None
    specs["ft2"] = spec(replace(models["ft2"], chain=models["base"].chain))  # back, changed
    b.reload(2.0)
    for m in models:
        assert b.flow.route(m, LiveViews(b.workers, lambda p, w: True)) == scan_route(b, m)
        assert indexed_edges(b, m) == plain_edges(b, m)
