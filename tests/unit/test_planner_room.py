"""Making room for a load (planner.py `_make_room`) keeps a model's sent route while its new
replica loads: the stage a sent route uses is not unloaded because scattered pieces elsewhere
still "cover" the model (the broker would route it over them, more hops), unless the model's
new stages cannot come (they wait for room themselves: a cycle of moves) or the load waited
`load_timeout_s`."""

from __future__ import annotations

from blockllm.broker.planner.placement import Placement
from blockllm.broker.planner.planner import Target
from blockllm.broker.protocol import LoadStage, PlannedHop, PlannedRoute, SetRoutes, UnloadStage
from tests.unit.test_planner import MB, planner, snapshot


def whole(worker: str) -> PlannedRoute:
    return PlannedRoute((PlannedHop(worker, ((0, 6),)),), 1.0)


def moved(p, stages: dict[str, list[tuple[str, int, int]]], workers: list[str]) -> None:
    """Give `p` a target placement: `stages` per worker, each model one whole-chain route."""
    routes = {m: (whole(w),) for w, ss in stages.items() for m, _, _ in ss}
    plan = Placement(stages=stages, routes=routes)
    p.target = Target(plan, frozenset(workers), frozenset({"m", "ft"}), {}, {}, at=0.0)
    for w, ss in stages.items():
        for owner, s, e in ss:
            p.target.stage_keys[(w, p._key(owner, s, e))] = (owner, s, e)


def unloads(cmds: list) -> list[tuple[str, str]]:
    return [(c.worker, c.key) for c in cmds if isinstance(c, UnloadStage)]


def test_a_moving_model_keeps_its_whole_chain_until_its_new_replica_is_routed() -> None:
    """m moves from w0 to w3 to make room on w0 for ft. w1 and w2 hold m's first and second
    halves: m stays "covered" without w0, but only over 2 hops. w0's copy goes only once m's
    route on w3 was sent."""
    p = planner()
    p.on_stats(snapshot({}), 0.0)  # the catalog
    p.routes_sent = {"m": (whole("w0"),)}
    before = {"w0": [("m", 0, 6)], "w1": [("m", 0, 3)], "w2": [("m", 3, 6)], "w3": []}
    moved(p, {"w0": [("ft", 0, 6)], "w3": [("m", 0, 6)]}, list(before))
    m_w0 = ("w0", p._key("m", 0, 6))
    cmds = p.on_stats(snapshot(before, budget=6 * MB), 1.0)
    assert [(c.worker, c.model) for c in cmds if isinstance(c, LoadStage)] == [("w3", "m")]
    assert unloads(cmds) == []  # ft waits: m's only one-hop route stays while w3 loads
    assert p.on_stats(snapshot(before, budget=6 * MB), 1.5) == []
    loaded = {**before, "w3": [("m", 0, 6)]}
    cmds = p.on_stats(snapshot(loaded, budget=6 * MB), 2.0)
    assert unloads(cmds) == []
    (routes,) = [c for c in cmds if isinstance(c, SetRoutes)]
    assert routes.routes["m"] == (whole("w3"),)  # the new replica takes m's traffic
    cmds = p.on_stats(snapshot(loaded, budget=6 * MB), 2.5)
    assert unloads(cmds) == [m_w0]  # no sent route uses it now: the room is made


def test_moves_that_wait_on_each_other_make_room_by_coverage_at_once() -> None:
    """m and ft swap w0 and w3, both full: each new stage waits for the room the other's old
    one holds. Neither is on its way, so neither old stage is spared: both go at once, the
    models still covered by the pieces on w1 and w2 (as before the rule)."""
    p = planner()
    p.on_stats(snapshot({}), 0.0)
    p.routes_sent = {"m": (whole("w0"),), "ft": (whole("w3"),)}
    before = {
        "w0": [("m", 0, 6)],
        "w1": [("m", 0, 3)],
        "w2": [("m", 3, 6), ("ft", 3, 6)],
        "w3": [("ft", 0, 6)],
    }
    moved(p, {"w0": [("ft", 0, 6)], "w3": [("m", 0, 6)]}, list(before))
    cmds = p.on_stats(snapshot(before, budget=6 * MB), 1.0)
    assert not any(isinstance(c, LoadStage) for c in cmds)
    assert sorted(unloads(cmds)) == [("w0", p._key("m", 0, 6)), ("w3", p._key("ft", 0, 6))]


def test_a_spared_stage_goes_once_the_load_waited_load_timeout_s() -> None:
    """w3's load of m is on its way but never shows up: after `load_timeout_s` ft's load on
    w0 makes room regardless (and m's load is sent again)."""
    p = planner(load_timeout_s=5.0)
    p.on_stats(snapshot({}), 0.0)
    p.routes_sent = {"m": (whole("w0"),)}
    before = {"w0": [("m", 0, 6)], "w1": [("m", 0, 3)], "w2": [("m", 3, 6)], "w3": []}
    moved(p, {"w0": [("ft", 0, 6)], "w3": [("m", 0, 6)]}, list(before))
    assert unloads(p.on_stats(snapshot(before, budget=6 * MB), 1.0)) == []
    assert unloads(p.on_stats(snapshot(before, budget=6 * MB), 5.5)) == []
    cmds = p.on_stats(snapshot(before, budget=6 * MB), 6.5)
    assert unloads(cmds) == [("w0", p._key("m", 0, 6))]
