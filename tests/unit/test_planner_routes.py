"""The planner sends a planned route only once every stage it names is hosted (planner/hosted.py):
the rules on small cases, then the command stream of the real Planner driving the real Broker
in the scale simulation (every SET_ROUTES checked against what the broker's workers host)."""

from __future__ import annotations

from typing import Any

import pytest

from blockllm.broker.planner.hosted import routes_to_send
from blockllm.broker.protocol import LoadStage, PlannedHop, PlannedRoute, SetRoutes
from blockllm.broker.rewire import keyed, resolve
from blockllm.broker.stage_index import LiveViews
from blockllm.client.bench.scale import Trace
from blockllm.client.bench.scale_sim import PLANNER, Sim
from blockllm.client.bench.scale_synth import GB, make_tenants, make_workers
from tests.unit.test_planner import planner, snapshot


def route(*hops: tuple[str, int, int]) -> PlannedRoute:
    return PlannedRoute(tuple(PlannedHop(w, ((s, e),)) for w, s, e in hops), 1.0)


def key(model: str, start: int, end: int) -> str:
    return f"{model}:{start}-{end}"


A = route(("w0", 0, 3), ("w1", 3, 6))  # a split replica
B = route(("w2", 0, 6))  # a whole one
OLD = route(("w3", 0, 6))  # the previous placement's


def test_a_model_keeps_its_previous_route_until_a_new_one_is_hosted() -> None:
    hosted = {"w0": {"m:0-3"}, "w3": {"m:0-6"}}  # w1 and w2 still loading
    got = routes_to_send({"m": (A, B)}, {"m": (OLD,)}, hosted, key, False)
    assert got == {"m": (OLD,)}
    hosted["w2"] = {"m:0-6"}
    got = routes_to_send({"m": (A, B)}, {"m": (OLD,)}, hosted, key, False)
    assert got == {"m": (B, OLD)}  # the hosted new one, the old one still serving
    hosted["w1"] = {"m:3-6"}
    assert routes_to_send({"m": (A, B)}, got, hosted, key, False) == {"m": (A, B)}


def test_a_route_whose_stage_went_away_is_withdrawn() -> None:
    hosted = {"w0": {"m:0-3"}, "w1": {"m:3-6"}, "w2": set()}  # B's stage unloaded
    assert routes_to_send({"m": (A, B)}, {"m": (A, B)}, hosted, key, True) == {"m": (A,)}
    del hosted["w0"]  # a lost worker
    assert routes_to_send({"m": (A, B)}, {"m": (A, B)}, hosted, key, True) == {}


def test_once_complete_only_the_target_routes_stay_unless_none_of_them_is_hosted() -> None:
    hosted = {"w2": {"m:0-6"}, "w3": {"m:0-6", "p:0-6", "q:0-6"}}
    previous = {"m": (OLD,), "p": (OLD,)}
    target = {"m": (B,), "q": (A,)}  # p is no longer routed by the target (pinned, removed)
    assert routes_to_send(target, previous, hosted, key, False) == {"m": (B,), "p": (OLD,)}
    assert routes_to_send(target, previous, hosted, key, True) == {"m": (B,)}
    # q's loads were given up: nothing of it is hosted, it keeps what it had that still is
    got = routes_to_send(target, {**previous, "q": (OLD,)}, hosted, key, True)
    assert got == {"m": (B,), "q": (OLD,)}


def test_an_assembled_chain_model_is_taken_as_it_is() -> None:
    got = routes_to_send({"m": (A,)}, {"m": (OLD,)}, {}, key, False, trusted={"m"})
    assert got == {"m": (OLD,)}
    assert routes_to_send({"m": (A,)}, {"m": (OLD,)}, {}, key, True, trusted={"m"}) == {"m": (A,)}


def test_the_planner_sends_each_route_as_its_stages_become_hosted() -> None:
    p = planner(min_demand=0.5)
    start = {"w0": [("m", 0, 6)], "w1": []}
    hot = {"m": 50.0}
    cmds = p.on_stats(snapshot(start, token_rate=hot), 0.0)
    assert p.target is not None and len(p.target.plan.replicas["m"]) == 2  # w0 and w1
    (routes,) = [c for c in cmds if isinstance(c, SetRoutes)]
    assert [r.hops[0].worker for r in routes.routes["m"]] == ["w0"]  # only the hosted one
    loads = [c for c in cmds if isinstance(c, LoadStage)]
    assert loads and {c.worker for c in loads} == {"w1"}
    assert not any(isinstance(c, SetRoutes) for c in p.on_stats(snapshot(start), 0.5))
    placed = {"w0": [("m", 0, 6)], "w1": [(c.model, c.start, c.end) for c in loads]}
    cmds = p.on_stats(snapshot(placed, token_rate=hot), 1.0)
    (routes,) = [c for c in cmds if isinstance(c, SetRoutes)]
    assert routes.routes == p.target.plan.routes


def unresolved(sim: Sim, routes: dict[str, Any]) -> list[tuple[str, Any]]:
    """The routes the broker cannot resolve now: a hop's worker is not registered or does not
    serve (live, not draining) the stage of one of its spans."""
    st = sim.broker.state
    views = LiveViews(st.workers, lambda peer, w: True)
    by_name = st.names()
    return [
        (model, r)
        for model, rs in routes.items()
        for r in rs
        if model in st.models and resolve(keyed(model, r, st.key_of), by_name, views) is None
    ]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("n_models", "n_workers", "seed"), [(18, 4, 1), (40, 8, 1)])
def test_no_route_is_sent_before_its_stages_are_ready(
    n_models: int, n_workers: int, seed: int
) -> None:
    """The scale simulation's day in the life (tenants arriving and leaving, drifts, a
    straggler's duplicate, two deaths, a join): at the moment each SET_ROUTES reaches the
    broker, every route it names resolves there."""
    capacity = 8 * GB
    tenants = make_tenants(n_models, seed=seed)
    initial = tenants[: int(0.9 * len(tenants))]
    workers = [(w.name, capacity) for w in make_workers(n_workers, capacity=capacity)]
    sim = Sim(initial, workers)
    sent: list[int] = []
    bad: list[tuple[float, str, Any]] = []
    to_broker = sim.to_broker

    def checked(peer: bytes, msg: Any, frames: tuple = ()) -> None:
        if peer == PLANNER and isinstance(msg, SetRoutes):
            sent.append(sum(len(rs) for rs in msg.routes.values()))
            bad.extend((sim.now, m, r) for m, r in unresolved(sim, dict(msg.routes)))
        to_broker(peer, msg, frames)

    sim.to_broker = checked  # type: ignore[method-assign]
    duration = 12.0
    Trace(sim, tenants, capacity, duration, 2.0 * n_workers, 16, seed).schedule()
    sim.run(duration + 3.0)
    assert len(sent) >= 3 and max(sent) >= n_models // 2  # routes were sent, many of them
    assert sim.planner is not None and sim.planner.replans >= 2
    assert not bad, bad[:3]
