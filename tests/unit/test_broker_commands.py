"""Planner commands to the pure Broker: forwarding, preferred routes, live moves, draining,
batch sizes, assembled chains, reload, and the stats body. No sockets, no sleeps."""

from __future__ import annotations

from dataclasses import replace

from blockllm.broker.protocol import (
    Ack,
    Forward,
    LoadStage,
    PlannedHop,
    PlannedRoute,
    Release,
    Reload,
    SetBatch,
    SetChain,
    SetRoutes,
    Substitution,
    Token,
    UnloadStage,
)
from blockllm.zoo.chain import stage_key
from tests.unit.broker_harness import BASE, FT, W0, W1, W2, Harness, ids_of, of, only

PLANNER = b"planner"


def route(*hops: tuple[str, list[tuple[int, int]]], weight: float = 1.0) -> PlannedRoute:
    return PlannedRoute(tuple(PlannedHop(w, tuple(spans)) for w, spans in hops), weight)


def two_full(**cfg) -> Harness:
    """w0 and w1 both host the whole base chain; w2 hosts base split in two stages."""
    h = Harness(**cfg)
    h.ready(W0, [("base", 0, 6)])
    h.ready(W1, [("base", 0, 6)])
    h.ready(W2, [("base", 0, 3), ("base", 3, 6)])
    return h


def ack(outs: list) -> Ack:
    return only(outs, Ack, PLANNER).msg


def test_load_stage_is_forwarded_to_the_named_worker() -> None:
    h = two_full()
    out = h.send(PLANNER, LoadStage("ft", 0, 6, 8, "w1", "c1"))
    assert ack(out) == Ack("c1", True, "load ft:0-6 on w1")
    assert only(out, LoadStage, W1).msg == LoadStage("ft", 0, 6, 8)
    assert not ack(h.send(PLANNER, LoadStage("ft", 0, 6, 0, "nobody", "c2"))).ok
    # a worker sending a command is a bad message, not a command
    assert h.send(W0, LoadStage("ft", 0, 6, 0, "w1", "c3"))[0].msg.code == "BAD_REQUEST"


def test_preferred_routes_spread_by_weight() -> None:
    h = two_full()
    routes = {"base": (route(("w0", [(0, 6)]), weight=1.0), route(("w1", [(0, 6)]), weight=1.0))}
    assert ack(h.send(PLANNER, SetRoutes("c1", routes))).ok
    firsts = [only(h.generate(f"r{i}"), Forward).peer for i in range(4)]
    assert sorted(firsts) == [W0, W0, W1, W1]
    assert h.broker.status(h.now).models["base"].planned_routes == routes["base"]


def test_preferred_route_is_validated_and_skipped_when_not_hosted() -> None:
    h = two_full()
    bad = {"base": (route(("w0", [(0, 4)])),)}
    assert not ack(h.send(PLANNER, SetRoutes("c1", bad))).ok
    split = {"base": (route(("w2", [(0, 3), (3, 6)])),)}
    assert ack(h.send(PLANNER, SetRoutes("c2", split))).ok
    fwd = only(h.generate("r1"), Forward)
    assert fwd.peer == W2 and len(fwd.msg.stage_keys) == 2
    del h.broker.workers[W2]  # the planned route no longer resolves: the broker routes itself
    assert only(h.generate("r2"), Forward).peer in (W0, W1)


def test_routes_equal_to_the_last_are_kept_and_checked_again_only_for_a_new_spec() -> None:
    h = two_full()
    st = h.broker.state
    assert ack(h.send(PLANNER, SetRoutes("c1", {"base": (route(("w0", [(0, 6)])),)}))).ok
    kept = st.preferred["base"]
    again = {"base": (route(("w0", [(0, 6)])),)}  # equal routes, other objects
    assert ack(h.send(PLANNER, SetRoutes("c2", again))).ok and st.preferred["base"] is kept
    st.models["base"] = replace(st.models["base"], chain_len=8)  # its chain changed
    assert not ack(h.send(PLANNER, SetRoutes("c3", again))).ok  # checked against the new one
    assert st.preferred["base"] is kept


def test_running_request_moves_at_its_next_step_without_losing_a_token() -> None:
    h = two_full(kv_migration=False)  # the replay move (KV migration: test_broker_migrate.py)
    h.send(PLANNER, SetRoutes("c0", {"base": (route(("w0", [(0, 6)])),)}))
    fwd = only(h.generate("r1", max_new_tokens=4), Forward)
    assert fwd.peer == W0
    out = h.token(W0, fwd.msg, 40)
    fwd2 = only(out, Forward, W0)
    assert ids_of(fwd2) == [40] and fwd2.msg.past_len == 3
    moved = {"base": (route(("w1", [(0, 6)])),)}
    assert ack(h.send(PLANNER, SetRoutes("c1", moved, move_running=True))).ok
    out = h.token(W0, fwd2.msg, 41)
    assert [t.msg.token_id for t in of(out, Token)] == [41]
    assert only(out, Release, W0)
    fwd3 = only(out, Forward, W1)
    # the move is a prefill of prompt + every generated token, on the new route
    assert ids_of(fwd3) == [5, 6, 7, 40, 41] and fwd3.msg.past_len == 0
    out = h.token(W1, fwd3.msg, 42)
    assert only(out, Forward, W1).msg.past_len == 5  # and it decodes on from there
    assert h.broker.counters["moved"] == 1


def test_unload_drains_the_stage_before_it_goes() -> None:
    h = two_full()
    h.send(PLANNER, SetRoutes("c0", {"base": (route(("w0", [(0, 6)])),)}))
    fwd = only(h.generate("r1", max_new_tokens=3), Forward)
    key = stage_key(BASE, 0, 6)
    assert ack(h.send(PLANNER, UnloadStage(key, "w0", "c1"))).ok
    assert not of(h.tick(0.1), UnloadStage)  # still used by r1
    assert only(h.generate("r2"), Forward).peer != W0  # new requests avoid it
    out = h.token(W0, fwd.msg, 40)  # r1's next step moves off the draining stage
    assert only(out, Release, W0) and only(out, Forward).peer != W0
    assert only(h.tick(0.1), UnloadStage, W0).msg == UnloadStage(key)
    assert key not in h.broker.workers[W0].stage_keys()


def test_unload_happens_at_the_drain_deadline_without_an_alternative() -> None:
    h = Harness()
    h.ready(W0, [("base", 0, 6)])
    fwd = only(h.generate("r1", max_new_tokens=5), Forward)
    h.send(PLANNER, UnloadStage(stage_key(BASE, 0, 6), "w0", "c1", 2.0))
    h.token(W0, fwd.msg, 40)  # nowhere to move: it stays
    assert not of(h.tick(1.0), UnloadStage)
    assert of(h.tick(1.5), UnloadStage)


def test_set_batch_is_forwarded_for_a_hosted_stage() -> None:
    h = two_full()
    key = stage_key(BASE, 0, 6)
    out = h.send(PLANNER, SetBatch("c1", "w1", key, 4))
    assert ack(out).ok and only(out, SetBatch, W1).msg.max_batch_size == 4
    assert not ack(h.send(PLANNER, SetBatch("c2", "w1", "nokey", 4))).ok
    assert not ack(h.send(PLANNER, SetBatch("c3", "w1", key, 0))).ok


def test_assembled_chain_routes_through_the_equivalent_resident_block() -> None:
    h = Harness()
    h.ready(W0, [("base", 0, 6)])  # only base's blocks are resident
    assert h.broker.route("ft", {}) is None
    assert not h.broker.covered("ft")
    chain = list(FT.chain)
    chain[3] = BASE.chain[3]  # the fine-tuned layer replaced by the base's equivalent one
    assert ack(h.send(PLANNER, SetChain("c1", "ft", tuple(chain)))).ok
    assert h.broker.covered("ft")
    assert only(h.generate("r1", model="ft"), Forward).peer == W0
    (sub,) = h.broker.status(h.now).models["ft"].substitutions
    assert sub == Substitution(position=3, block=BASE.chain[3], from_="base")
    assert not ack(h.send(PLANNER, SetChain("c2", "ft", ("x",)))).ok
    assert ack(h.send(PLANNER, SetChain("c3", "ft", ()))).ok  # back to exact
    assert not h.broker.covered("ft")


def test_reload_answers_with_the_models() -> None:
    h = Harness()
    assert ack(h.send(PLANNER, Reload("c1"))) == Ack("c1", True, "base,ft")


def test_stats_body_has_demand_and_latency_per_model() -> None:
    h = Harness()
    h.ready(W0, [("base", 0, 6)])
    fwd = only(h.generate("r1", max_new_tokens=2), Forward)
    h.now += 0.2
    fwd = only(h.token(W0, fwd.msg, 40), Forward)
    h.now += 0.05
    h.token(W0, fwd.msg, 41)
    base = h.broker.stats(h.now).models["base"]
    assert base.rate_rps > 0 and base.completed == 1
    assert abs(base.ttft_ms_p50 - 200) < 1 and abs(base.tpot_ms_p95 - 50) < 1
    assert base.covered and base.route == (PlannedHop("w0", ((0, 6),)),)
    (w,) = h.broker.stats(h.now).workers
    assert w.name == "w0" and w.draining == () and w.memory_budget_bytes == 0
