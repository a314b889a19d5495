"""KV migration in the pure Broker: a moving request's stage KV goes old worker -> broker ->
new worker (frames passed on untouched) and it decodes on; every failure falls back to the
replay move. No sockets, no sleeps: time is a number the test advances."""

from __future__ import annotations

from blockllm.broker.migrate import plan_transfers
from blockllm.broker.protocol import (
    Dead,
    Forward,
    KvAck,
    KvExport,
    KvShard,
    Release,
    SetRoutes,
    TensorMeta,
    Token,
)
from blockllm.broker.routing import Hop
from blockllm.zoo.chain import stage_key
from tests.unit.broker_harness import BASE, W0, W1, W2, Harness, ids_of, of, only
from tests.unit.test_broker_commands import PLANNER, ack, route, two_full

KV = (TensorMeta("float32", (4, 4, 2, 16)), TensorMeta("float32", (4, 4, 2, 16)))
KEY = stage_key(BASE, 0, 6)


def running_on_w0(**cfg) -> tuple[Harness, Forward]:
    """r1 (prompt 5 6 7) on w0, one token generated, its next step in flight on w0."""
    h = two_full(**cfg)
    h.send(PLANNER, SetRoutes("c0", {"base": (route(("w0", [(0, 6)])),)}))
    fwd = only(h.generate("r1", max_new_tokens=6), Forward).msg
    fwd2 = only(h.token(W0, fwd, 40), Forward, W0).msg
    return h, fwd2


def move_to(h: Harness, worker: str, spans=((0, 6),)) -> None:
    moved = {"base": (route((worker, list(spans))),)}
    assert ack(h.send(PLANNER, SetRoutes("c1", moved, move_running=True))).ok


def test_plan_transfers_moves_only_stages_with_kv_whose_worker_changes() -> None:
    old = [Hop(W0, ("e", "a"), ((0, 1), (1, 3))), Hop(W1, ("b",), ((3, 6),))]
    new = [Hop(W2, ("e",), ((0, 1),)), Hop(W1, ("a", "b"), ((1, 3), (3, 6)))]
    has_kv = lambda a, b: b > 1  # noqa: E731  (position 0 is the embedding)
    assert plan_transfers(old, new, has_kv) == [("a", W0, W1)]
    assert plan_transfers(old, [Hop(W2, ("x",), ((0, 6),))], has_kv) is None


def test_a_moving_request_migrates_its_kv_and_decodes_on() -> None:
    h, fwd2 = running_on_w0()
    move_to(h, "w1")
    out = h.token(W0, fwd2, 41)
    assert [t.msg.token_id for t in of(out, Token)] == [41]
    export = only(out, KvExport, W0).msg
    assert export.stage_key == KEY and export.length == 4  # 3 prompt + 2 generated - 1
    assert not of(out, Forward) and not of(out, Release)  # paused while its KV moves
    assert not of(h.tick(1.0), Forward)  # not hedged while paused (hedge_after_s 0.5)
    frames = (object(), object())  # stand for zmq.Frames: the broker must pass them on
    shard = KvShard(export.transfer_id, "b1", KEY, 4, 0, KV)
    out = h.send(W0, shard, frames)
    fwd = only(out, KvShard, W1)
    assert fwd.frames[0] is frames[0] and fwd.frames[1] is frames[1]
    assert fwd.msg.max_total_len == 9 and fwd.msg.tensors == KV and fwd.msg.length == 4
    out = h.send(W1, KvAck(export.transfer_id, "b1", KEY, True))
    assert only(out, Release, W0)  # the old copy is freed
    step = only(out, Forward, W1)
    assert ids_of(step) == [41] and step.msg.past_len == 4  # a decode, not a prefill
    out = h.token(W1, step.msg, 42)
    assert only(out, Forward, W1).msg.past_len == 5
    c = h.broker.counters
    assert (c["migrations"], c["migrations_failed"], c["moved"]) == (1, 0, 1)
    assert c["migrated_bytes"] == 2 * 4 * 4 * 2 * 16 * 4 and c["replays"] == 0
    assert h.broker.status(h.now).counters["migrations"] == 1


def replayed(out: list, peer: bytes | None = None) -> Forward:
    """The fallback: a prefill of prompt + every generated token."""
    step = only(out, Forward, peer)
    assert ids_of(step) == [5, 6, 7, 40, 41] and step.msg.past_len == 0
    return step.msg


def test_an_export_refusal_falls_back_to_replay() -> None:
    h, fwd2 = running_on_w0()
    move_to(h, "w1")
    export = only(h.token(W0, fwd2, 41), KvExport, W0).msg
    out = h.send(W0, KvAck(export.transfer_id, "b1", KEY, False, "KV_MISS", "evicted"))
    assert only(out, Release, W0)
    replayed(out, W1)
    # a late shard of the abandoned transfer is dropped
    assert not h.send(W0, KvShard(export.transfer_id, "b1", KEY, 4, 0, KV), (b"", b""))
    c = h.broker.counters
    assert (c["migrations"], c["migrations_failed"], c["moved"]) == (0, 1, 1)


def test_an_import_refusal_falls_back_and_releases_the_new_worker() -> None:
    h, fwd2 = running_on_w0()
    move_to(h, "w1")
    export = only(h.token(W0, fwd2, 41), KvExport, W0).msg
    h.send(W0, KvShard(export.transfer_id, "b1", KEY, 4, 0, KV), (b"", b""))
    out = h.send(W1, KvAck(export.transfer_id, "b1", KEY, False, "CACHE_FULL", "full"))
    assert {o.peer for o in of(out, Release)} == {W0, W1}
    assert h.broker.counters["migrations_failed"] == 1


def test_the_old_worker_lost_mid_migration_replays() -> None:
    h, fwd2 = running_on_w0()
    move_to(h, "w1")
    export = only(h.token(W0, fwd2, 41), KvExport, W0).msg
    out = h.send(W0, Dead("killed"))
    replayed(out, W1)
    assert not h.broker.migrating
    assert not h.send(W1, KvAck(export.transfer_id, "b1", KEY, True))  # stale


def test_the_new_worker_lost_or_a_timeout_replays() -> None:
    h, fwd2 = running_on_w0(migrate_timeout_s=2.0)
    move_to(h, "w1")
    only(h.token(W0, fwd2, 41), KvExport, W0)
    out = h.tick(2.0)
    assert only(out, Release, W0) and only(out, Release, W1)
    replayed(out, W1)
    h2, fwd2 = running_on_w0()
    move_to(h2, "w1")
    only(h2.token(W0, fwd2, 41), KvExport, W0)
    del h2.broker.workers[W1]
    out = h2.tick(0.01)
    assert h2.broker.counters["migrations_failed"] == 1 and not h2.broker.migrating


def test_a_move_to_stages_it_holds_no_kv_in_replays_at_once() -> None:
    h, fwd2 = running_on_w0()
    move_to(h, "w2", spans=((0, 3), (3, 6)))  # other stage keys: nothing to migrate from
    out = h.token(W0, fwd2, 41)
    assert not of(out, KvExport) and only(out, Release, W0)
    replayed(out, W2)


def test_migration_off_replays() -> None:
    h, fwd2 = running_on_w0(kv_migration=False)
    move_to(h, "w1")
    out = h.token(W0, fwd2, 41)
    assert not of(out, KvExport)
    replayed(out, W1)


def test_a_request_keeps_the_route_holding_its_kv_when_no_better_one_exists() -> None:
    h = two_full()
    both = {"base": (route(("w0", [(0, 6)])), route(("w1", [(0, 6)])))}
    assert ack(h.send(PLANNER, SetRoutes("c0", both))).ok
    fwd = only(h.generate("r1", max_new_tokens=6), Forward)
    first = fwd.peer
    fwd2 = only(h.token(first, fwd.msg, 40), Forward, first).msg
    assert ack(h.send(PLANNER, SetRoutes("c1", both, move_running=True))).ok
    out = h.token(first, fwd2, 41)  # the other replica is empty, but no better per weight
    assert not of(out, KvExport) and not of(out, Release)
    step = only(out, Forward, first)
    assert step.msg.past_len == 4 and h.broker.counters["moved"] == 0


def test_a_request_leaves_for_a_route_much_better_per_weight() -> None:
    h = two_full()
    h.send(PLANNER, SetRoutes("c0", {"base": (route(("w0", [(0, 6)])),)}))
    fwd = only(h.generate("r1", max_new_tokens=6), Forward).msg
    fwd2 = only(h.token(W0, fwd, 40), Forward, W0).msg
    skewed = {"base": (route(("w0", [(0, 6)]), weight=0.1), route(("w1", [(0, 6)])))}
    assert ack(h.send(PLANNER, SetRoutes("c1", skewed, move_running=True))).ok
    out = h.token(W0, fwd2, 41)  # 1 / 0.1 on w0 against (0 + 1) / 1 on w1: it moves
    assert only(out, KvExport, W0)
