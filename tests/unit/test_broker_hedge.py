"""Hedged steps in the pure Broker: a late decode step is re-sent to a duplicate, the first
answer wins, the loser is released and its late answers dropped; no token twice, none lost."""

from __future__ import annotations

from blockllm.broker.protocol import Dead, Forward, Release, Result, Token
from tests.unit.broker_harness import W0, W1, Harness, ids_of, of, only


def duplicated() -> Harness:
    h = Harness(hedge_after_s=0.5)
    h.ready(W0, [("base", 0, 6)])
    h.ready(W1, [("base", 0, 6)])  # a duplicate of the whole chain
    return h


def decoding(h: Harness) -> Forward:
    """r1 routed on w0, past its prefill: the FORWARD of its first decode step."""
    fwd = only(h.generate("r1", max_new_tokens=6), Forward, W0).msg
    return only(h.token(W0, fwd, 40), Forward, W0).msg


def test_prefill_steps_are_not_hedged() -> None:
    h = duplicated()
    only(h.generate("r1"), Forward, W0)
    assert not of(h.tick(5.0), Forward)


def test_late_step_is_resent_and_the_first_answer_wins() -> None:
    h = duplicated()
    fwd = decoding(h)
    assert not of(h.tick(0.3), Forward)  # not late yet
    shadow = only(h.tick(0.3), Forward, W1)
    assert shadow.msg.request_id == "b1~1" and shadow.msg.step == fwd.step
    assert ids_of(shadow) == [5, 6, 7, 40] and shadow.msg.past_len == 0  # a prefill
    out = h.send(W1, Result("b1~1", shadow.msg.step, token_id=41))
    assert [t.msg.token_id for t in of(out, Token)] == [41]
    assert only(out, Release, W0).msg.request_id == "b1"  # the loser's KV is freed
    nxt = only(out, Forward, W1).msg
    assert nxt.request_id == "b1~1" and nxt.past_len == 4  # decoding on where it won
    # the slow attempt answers at last: dropped, no token twice
    assert not of(h.token(W0, fwd, 41), Token)
    assert h.broker.counters["hedges_won"] == 1
    out = h.send(W1, Result("b1~1", nxt.step, token_id=42))
    assert [t.msg.token_id for t in of(out, Token)] == [42]


def test_original_answer_first_drops_the_shadow() -> None:
    h = duplicated()
    fwd = decoding(h)
    shadow = only(h.tick(0.6), Forward, W1).msg
    out = h.token(W0, fwd, 41)
    assert [t.msg.token_id for t in of(out, Token)] == [41]
    assert only(out, Release, W1).msg.request_id == "b1~1"
    assert only(out, Forward, W0).msg.request_id == "b1"
    assert not of(h.send(W1, Result("b1~1", shadow.step, token_id=41)), Token)
    assert h.broker.workers[W1].inflight == {}


def test_losing_the_original_worker_promotes_the_shadow_without_a_replay() -> None:
    h = duplicated()
    decoding(h)
    shadow = only(h.tick(0.6), Forward, W1).msg
    out = h.send(W0, Dead("crash"))
    assert not of(out, Forward)  # no replay: the shadow carries on
    out = h.send(W1, Result("b1~1", shadow.step, token_id=41))
    assert [t.msg.token_id for t in of(out, Token)] == [41]
    assert h.broker.counters["replays"] == 0


def test_no_duplicate_no_hedge() -> None:
    h = Harness(hedge_after_s=0.5)
    h.ready(W0, [("base", 0, 6)])
    decoding(h)
    assert not of(h.tick(5.0), Forward)
