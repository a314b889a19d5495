"""Configured stages are pins (19.5): the planner keeps them, leaves a model they cover to them
(its own copies unloaded, so the operator's split takes effect) and places the model again only
once a pinning worker is lost."""

from __future__ import annotations

from blockllm.broker.protocol import LoadStage, SetRoutes, UnloadStage
from blockllm.zoo.chain import stage_key
from tests.unit.test_planner import BASE, FT, planner, snapshot

PIN_A = [("m", 0, 3)]
PIN_B = [("m", 3, 6), ("ft", 0, 6)]


def pins(**workers: list[tuple[str, int, int]]) -> dict:
    key = {"m": BASE, "ft": FT}
    return {w: {"pinned": [stage_key(key[m], s, e) for m, s, e in st]} for w, st in workers.items()}


def test_pins_are_kept_and_take_over_their_models_once_they_cover_them():
    p = planner()
    # the documented start order: node A (pin m:0-3) is alone, so the planner places the models
    cmds = p.on_stats(snapshot({"w0": PIN_A}, {"m": False, "ft": False}, extra=pins(w0=PIN_A)), 0)
    loads = [(c.model, c.start, c.end) for c in cmds if isinstance(c, LoadStage)]
    assert loads and all(c.worker == "w0" for c in cmds if isinstance(c, LoadStage))
    w0 = PIN_A + loads
    cmds = p.on_stats(snapshot({"w0": w0}, extra=pins(w0=PIN_A)), 1.0)
    unloaded = {(c.worker, c.key) for c in cmds if isinstance(c, UnloadStage)}
    assert ("w0", stage_key(BASE, 0, 3)) not in unloaded  # a pin stays, though superseded
    # node B joins with its configured stages: m and ft are covered by pins alone now
    both = {"w0": w0, "w1": PIN_B}
    cmds = p.on_stats(snapshot(both, extra=pins(w0=PIN_A, w1=PIN_B)), 2.0)
    cmds += p.on_stats(snapshot(both, extra=pins(w0=PIN_A, w1=PIN_B)), 3.0)
    assert not [c for c in cmds if isinstance(c, LoadStage)]
    routes = [c for c in cmds if isinstance(c, SetRoutes)]
    assert routes and not ({"m", "ft"} & set(routes[-1].routes))  # the broker routes via pins
    unloaded = {(c.worker, c.key) for c in cmds if isinstance(c, UnloadStage)}
    planner_loaded = {("w0", stage_key(BASE if m == "m" else FT, s, e)) for m, s, e in loads}
    assert unloaded == planner_loaded - {("w0", stage_key(BASE, 0, 3))}
    # node B is lost: its pins go with it, and the planner covers the models again
    lost = p.on_stats(snapshot({"w0": PIN_A}, {"m": False, "ft": False}, extra=pins(w0=PIN_A)), 4)
    assert [c for c in lost if isinstance(c, LoadStage)]
    assert not [c for c in lost if isinstance(c, UnloadStage)]


def test_a_worker_marks_its_configured_stages_pinned_only_when_told():
    from dataclasses import replace

    from blockllm.broker.protocol import StageRef
    from blockllm.worker.config import StageSpec, WorkerProcConfig
    from blockllm.worker.facts import pinned_keys

    cfg = WorkerProcConfig("tcp://127.0.0.1:1", "/zoo", stages=(StageSpec("m", 0, 3),))
    loaded = (StageRef("k0", "m", 0, 3), StageRef("k1", "m", 3, 6))  # k1: the planner's load
    assert pinned_keys(cfg, loaded) == ()  # serve's and test clusters' workers
    assert pinned_keys(replace(cfg, pin_stages=True), loaded) == ("k0",)  # blockllm worker
