"""The routes STATUS and STATS show are cached between builds (broker/shown.py): after every
change below, the cached build's body equals a build from scratch, and a build recomputes only
the models whose routing inputs changed (none when only loads and requests moved)."""

from __future__ import annotations

from dataclasses import replace

from blockllm.broker.protocol import (
    Ack,
    Dead,
    Error,
    Forward,
    PlannedHop,
    PlannedRoute,
    Reload,
    SetChain,
    SetRoutes,
    UnloadStage,
)
from blockllm.broker.shown import ShownRoutes
from blockllm.broker.stats import stats_body
from blockllm.zoo.chain import stage_key
from tests.unit.broker_harness import BASE, FT, W0, W1, W2, Harness, only

PLANNER = b"planner"


def same_as_from_scratch(h: Harness) -> int:
    """Assert the cached body is the one built from scratch; the routes computed for it."""
    before = h.broker.state.shown.computed
    cached = h.broker.stats(h.now)
    computed = h.broker.state.shown.computed - before
    scratch = stats_body(h.broker.state, h.broker.flow.route, h.now, ShownRoutes(scratch=True))
    assert cached == scratch
    return computed


def route(*hops: tuple[str, tuple[tuple[int, int], ...]], weight: float = 1.0) -> PlannedRoute:
    return PlannedRoute(tuple(PlannedHop(w, spans) for w, spans in hops), weight)


def test_the_cached_body_is_the_body_built_from_scratch_after_each_change() -> None:
    h = Harness()
    assert same_as_from_scratch(h) == 2  # both models, nothing hosted
    h.ready(W0, [("base", 0, 3), ("ft", 3, 6)])
    h.ready(W1, [("base", 3, 6)])
    assert same_as_from_scratch(h) == 2
    assert same_as_from_scratch(h) == 0  # nothing changed: nothing recomputed
    body = h.broker.stats(h.now)
    assert body.models["base"].route == (PlannedHop("w0", ((0, 3),)), PlannedHop("w1", ((3, 6),)))
    assert body.models["ft"].route == (PlannedHop("w0", ((0, 3), (3, 6))),)  # shares 0-3

    # requests come and go, loads change: the routes shown stay, nothing is recomputed
    fwd = only(h.generate("r1"), Forward)
    h.generate("r2")
    assert same_as_from_scratch(h) == 0
    assert h.broker.stats(h.now).models["base"].running == 2

    # a ban (CACHE_FULL) takes w1 out of the route shown; its end puts it back
    h.send(W0, Error(fwd.msg.request_id, "CACHE_FULL", "full", True, fwd.msg.step))
    assert h.broker.workers[W0].banned(h.now)
    assert same_as_from_scratch(h) >= 1
    shown = h.broker.stats(h.now).models["base"]  # only the ban is in the way: still shown
    assert shown.covered and shown.route == (
        PlannedHop("w0", ((0, 3),)),
        PlannedHop("w1", ((3, 6),)),
    )
    h.tick(h.broker.workers[W0].banned_until - h.now + 0.01)  # before the workers expire
    assert not h.broker.workers[W0].banned(h.now)
    assert same_as_from_scratch(h) >= 1

    # a worker joins with the whole chain, another stage is drained for an unload
    h.ready(W2, [("base", 0, 6)])
    assert same_as_from_scratch(h) >= 1
    assert h.broker.stats(h.now).models["base"].route == (PlannedHop("w2", ((0, 6),)),)
    h.send(PLANNER, UnloadStage(stage_key(BASE, 0, 6), "w2", "c1", 5.0))
    assert same_as_from_scratch(h) >= 1
    assert h.broker.stats(h.now).models["base"].route[0].worker == "w0"

    # the planner's routes, and the requests that run on them, pick the route shown
    planned = (route(("w0", ((0, 3),)), ("w1", ((3, 6),)), weight=2.0),)
    assert only(h.send(PLANNER, SetRoutes("c2", {"base": planned})), Ack).msg.ok
    assert same_as_from_scratch(h) >= 1
    h.generate("r3")
    assert same_as_from_scratch(h) == 0  # the requests running on them do not move it

    # an assembled chain serves ft through base's block; a worker re-registers; one dies
    chain = list(FT.chain)
    chain[3] = BASE.chain[3]
    h.send(PLANNER, SetChain("c3", "ft", tuple(chain)))
    assert same_as_from_scratch(h) == 2
    assert h.broker.stats(h.now).models["ft"].substitutions[0].position == 3
    h.ready(W1, [("base", 3, 6), ("base", 0, 6)])
    assert same_as_from_scratch(h) >= 1
    h.send(W0, Dead("gone"))
    assert same_as_from_scratch(h) >= 1
    h.send(PLANNER, Reload("c4"))
    assert same_as_from_scratch(h) == 0  # the same specs
    catalog = h.broker.state.catalog()
    catalog["base"] = replace(catalog["base"], max_positions=32)  # base's spec changed
    h.send(PLANNER, Reload("c5"))
    assert same_as_from_scratch(h) == 1
    del catalog["ft"]  # a model went: the others' stage keys are the same, their routes kept
    h.send(PLANNER, Reload("c6"))
    assert same_as_from_scratch(h) == 0 and list(h.broker.stats(h.now).models) == ["base"]


def test_a_planned_route_shown_is_recomputed_only_when_a_worker_it_names_changes() -> None:
    """A route shown that is one of the planner's routes depends on the workers they name
    alone: stages coming on other workers, even stages serving the model, leave it."""
    h = Harness()
    h.ready(W0, [("base", 0, 6)])
    h.ready(W1, [("base", 0, 3)])
    planned = (route(("w0", ((0, 6),))), route(("w2", ((0, 6),)), weight=3.0))
    assert only(h.send(PLANNER, SetRoutes("c1", {"base": planned})), Ack).msg.ok
    same_as_from_scratch(h)
    kept = h.broker.state.shown._shown["base"]
    assert kept[3] and kept[0][0] == (PlannedHop("w0", ((0, 6),)),)
    h.ready(W1, [("base", 0, 3), ("base", 3, 6)])  # w1 now chains base too: not named
    same_as_from_scratch(h)
    assert h.broker.state.shown._shown["base"] is kept
    h.ready(W2, [("base", 0, 6)])  # w2 is named (weight 3): its route wins now
    same_as_from_scratch(h)
    assert h.broker.stats(h.now).models["base"].route == (PlannedHop("w2", ((0, 6),)),)
    h.send(PLANNER, UnloadStage(stage_key(BASE, 0, 6), "w2", "c2", 5.0))  # drained
    same_as_from_scratch(h)
    assert h.broker.stats(h.now).models["base"].route == (PlannedHop("w0", ((0, 6),)),)
    h.send(W0, Dead("gone"))  # no planned route resolves: the fewest hops over w1
    same_as_from_scratch(h)
    assert h.broker.stats(h.now).models["base"].route == (PlannedHop("w1", ((0, 3), (3, 6))),)
    assert not h.broker.state.shown._shown["base"][3]
