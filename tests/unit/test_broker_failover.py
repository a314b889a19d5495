"""The pure Broker state machine (tests/unit/broker_harness.py) when things go wrong or run
short: fail-over and replays (KV_MISS, a dead or silent worker, CACHE_FULL, a worker that lost
its stage, stale results), waiting and timeouts, the flow limits (credits, KV bytes, the waiting
room), cancel, resume, and bad or unknown peers' messages. No sockets, no sleeps.
"""

from __future__ import annotations

from blockllm.broker.protocol import (
    Cancel,
    Dead,
    Error,
    ErrorCode,
    Forward,
    Heartbeat,
    Release,
    Result,
    Token,
)
from tests.unit.broker_harness import (
    CLIENT,
    HIDDEN,
    LAYERS,
    W0,
    W1,
    W2,
    Harness,
    ids_of,
    of,
    only,
    run_step,
)

# -- fail-over -------------------------------------------------------------------------------


def test_kv_miss_replays_prompt_and_generated(split: Harness) -> None:
    h = split
    outs = h.generate("r1", max_new_tokens=8)
    outs = run_step(h, only(outs, Forward, W0), 42)
    fwd = only(outs, Forward, W0).msg
    outs = h.send(W0, Error(fwd.request_id, ErrorCode.KV_MISS.value, "evicted", True, fwd.step))
    assert {o.peer for o in of(outs, Release)} == {W0, W1}
    replay = only(outs, Forward, W0)
    assert ids_of(replay) == [5, 6, 7, 42] and replay.msg.past_len == 0
    assert replay.msg.step > fwd.step
    outs = run_step(h, replay, 43)
    assert only(outs, Token).msg.index == 1, "no duplicate tokens after a replay"
    assert h.broker.counters["replays"] == 1


def test_dead_worker_replays_on_another(h: Harness) -> None:
    h.ready(W0, [("base", 0, 6)])
    h.ready(W1, [("base", 0, 6)])
    fwd = only(h.generate("r1"), Forward)
    first = fwd.peer
    other = W1 if first == W0 else W0
    outs = h.token(first, fwd.msg, 42)
    outs = h.send(first, Dead("boom"))
    assert first not in h.broker.workers
    replay = only(outs, Forward, other)
    assert ids_of(replay) == [5, 6, 7, 42] and replay.msg.past_len == 0
    assert not [o for o in of(outs, Release) if o.peer == first]


def test_heartbeat_expiry_replays(h: Harness) -> None:
    h.ready(W0, [("base", 0, 6)])
    fwd = only(h.generate("r1"), Forward, W0)
    h.tick(1.0)
    h.ready(W1, [("base", 0, 6)])
    outs = h.tick(h.cfg.expiry_s - 0.5)  # w0 silent for the whole expiry, w1 not
    assert W0 not in h.broker.workers and W1 in h.broker.workers
    replay = only(outs, Forward, W1)
    assert ids_of(replay) == [5, 6, 7] and replay.msg.step > fwd.msg.step
    assert h.broker.counters["workers_expired"] == 1


def test_idle_workers_are_pinged_and_inbound_refreshes(h: Harness) -> None:
    h.ready(W0, [("base", 0, 6)])
    assert only(h.tick(h.cfg.heartbeat_s), Heartbeat, W0)
    assert not of(h.tick(0.1), Heartbeat), "not pinged again before an interval"
    h.send(W0, Heartbeat(free_slots=3, queue_depths={"k": 2}, rss_bytes=10))
    assert h.broker.workers[W0].expires_at == h.now + h.cfg.expiry_s
    assert h.broker.workers[W0].queue_depths == {"k": 2}


def test_cache_full_bans_and_replays_elsewhere() -> None:
    h = Harness(ban_base_s=0.5, ban_max_s=2.0)
    h.ready(W0, [("base", 0, 6)])
    h.ready(W1, [("base", 0, 6)])
    fwd = only(h.generate("r1"), Forward)
    bad, good = fwd.peer, (W1 if fwd.peer == W0 else W0)
    outs = h.send(bad, Error(fwd.msg.request_id, "CACHE_FULL", "full", True, fwd.msg.step))
    assert only(outs, Forward).peer == good
    assert h.broker.workers[bad].banned(h.now)
    # a new request avoids the banned worker too, until the ban passes
    assert only(h.generate("r2"), Forward).peer == good
    assert h.broker.workers[bad].banned_until == h.now + 0.5
    h.tick(0.5)
    assert not h.broker.workers[bad].banned(h.now)
    # a second ban in a row lasts twice as long; a good result resets the count
    assert h.broker.workers[bad].ban(h.now, 0.5, 2.0) == 1.0


def test_ready_without_a_stage_replays_its_requests(split: Harness) -> None:
    h = split
    fwd = only(h.generate("r1"), Forward, W0)
    outs = h.ready(W1, [("base", 0, 6)])  # w1 now hosts the whole model, not its old stages
    assert {o.peer for o in of(outs, Release)} == {W0, W1}
    replay = only(outs, Forward, W1)
    assert replay.msg.step > fwd.msg.step
    assert h.hidden(W0, fwd.msg)[0] == [], "the old step's result is stale"


def test_stale_results_are_ignored(split: Harness) -> None:
    fwd = only(split.generate("r1"), Forward, W0)
    assert split.send(W1, Result(fwd.msg.request_id, fwd.msg.step, tensors=HIDDEN), (b"",)) == []
    assert split.send(W0, Result("nope", 1, token_id=3)) == []
    assert split.send(W0, Result(fwd.msg.request_id, 99, token_id=3)) == []
    assert split.broker.counters["stale_results"] == 3


def test_no_route_waits_then_times_out(h: Harness) -> None:
    h.ready(W0, [("base", 0, 3)])  # half a model
    assert h.generate("r1", timeout_s=5.0) == []
    assert not [o for o in h.tick(0.9) if o.peer == CLIENT]
    h.send(W0, Heartbeat(free_slots=8))
    h.tick(0.9)
    assert h.broker.requests, "waits for a route until its deadline"
    outs = h.tick(3.5)
    err = only(outs, Error, CLIENT).msg
    assert (err.request_id, err.code) == ("r1", ErrorCode.NO_ROUTE.value)
    assert not h.broker.requests


def test_waiting_request_starts_when_a_worker_arrives(h: Harness) -> None:
    assert h.generate("r1") == []
    assert only(h.ready(W0, [("base", 0, 6)]), Forward, W0)


def test_running_request_times_out_and_releases(h: Harness) -> None:
    h.ready(W0, [("base", 0, 6)])
    h.generate("r1", timeout_s=2.0)
    outs = h.tick(2.0)
    assert only(outs, Error, CLIENT).msg.code == ErrorCode.TIMEOUT.value
    assert only(outs, Release, W0)


def test_overloaded_when_waiting_queue_is_full() -> None:
    h = Harness(max_waiting=2)
    assert h.generate("r1") == [] and h.generate("r2") == []
    err = only(h.generate("r3"), Error).msg
    assert err.code == ErrorCode.OVERLOADED.value and err.retryable
    assert len(h.broker.requests) == 2


def test_no_waiting_room_still_admits_what_can_start() -> None:
    h = Harness(max_waiting=0)
    h.ready(W0, [("base", 0, 6)], slots=1)
    assert only(h.generate("r1"), Forward, W0)
    assert only(h.generate("r2"), Error).msg.code == ErrorCode.OVERLOADED.value


def test_credits_limit_dispatch(h: Harness) -> None:
    h.ready(W0, [("base", 0, 6)], slots=1)
    fwd = only(h.generate("r1", max_new_tokens=1), Forward, W0)
    assert h.generate("r2") == [], "no credit: r2 waits"
    outs = h.token(W0, fwd.msg, 42)  # r1 finishes (length 1) and frees the slot
    assert only(outs, Token).msg.finish_reason == "length"
    assert ids_of(only(outs, Forward, W0)) == [5, 6, 7]
    # a heartbeat's report counts what is in flight at that moment
    h.send(W0, Heartbeat(free_slots=0))
    assert h.generate("r3") == []


def test_kv_bytes_limit_dispatch(h: Harness) -> None:
    h.ready(W0, [("base", 0, 6)], kv_free_bytes=512 * LAYERS * 6)  # exactly one request of 6
    assert only(h.generate("r1", max_new_tokens=3), Forward)
    assert h.generate("r2", max_new_tokens=3) == []


def test_cancel_releases_and_answers(split: Harness) -> None:
    only(split.generate("r1"), Forward, W0)
    outs = split.send(CLIENT, Cancel("r1"))
    assert only(outs, Error, CLIENT).msg.code == ErrorCode.CANCELLED.value
    assert {o.peer for o in of(outs, Release)} == {W0, W1}
    assert not split.broker.requests
    assert split.send(b"other", Cancel("r1")) == []


def test_resume_continues_index(split: Harness) -> None:
    outs = split.generate("r1", resume_ids=(40, 41), max_new_tokens=4)
    fwd = only(outs, Forward, W0)
    assert ids_of(fwd) == [5, 6, 7, 40, 41]
    tok = only(run_step(split, fwd, 42), Token).msg
    assert tok.index == 2


def test_bad_message_is_counted_and_answered(h: Harness) -> None:
    out = h.broker.bad_message(b"x", "garbage", h.now)
    assert only(out, Error).msg.code == ErrorCode.BAD_REQUEST.value
    out = h.send(b"x", Token("r", 0, 1, "t"))  # a kind the broker never receives
    assert only(out, Error).msg.code == ErrorCode.BAD_REQUEST.value
    assert h.broker.counters["bad_messages"] == 2


def test_heartbeat_from_unknown_worker_asks_for_ready(h: Harness) -> None:
    err = only(h.send(W2, Heartbeat()), Error).msg
    assert err.code == ErrorCode.WORKER_LOST.value
