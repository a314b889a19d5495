"""Speculative execution in the pure Broker: a decode step's input to hop j >= 1 of a model that
speculates also goes, as the same frame objects (never decoded), to hop j+1's worker as a
SPECULATE; nothing else in the request flow changes."""

from __future__ import annotations

import pytest

from blockllm.broker.config import BrokerConfig
from blockllm.broker.protocol import Forward, Result, Speculate, TensorMeta, Token
from blockllm.zoo.chain import stage_key
from tests.unit.broker_harness import BASE, HIDDEN, W0, W1, W2, Harness, Out, of, only


def three_hops(h: Harness) -> Harness:
    """w0: embed + layers 0..1, w1: layer 2, w2: layer 3 + head (both models)."""
    h.ready(W0, [("base", 0, 3)])
    h.ready(W1, [("base", 3, 4), ("ft", 3, 4)])
    h.ready(W2, [("base", 4, 6)])
    return h


def step(h: Harness, fwd0: Out, token_id: int) -> tuple[list[Out], list[Out], object, Out]:
    """Hop 0 -> hop 1 -> hop 2 -> token: (what hop 0's RESULT produced, what hop 1's did,
    the frame hop 0 returned, the next step's FORWARD to hop 0 or the last TOKEN)."""
    outs0, frame = h.hidden(W0, fwd0.msg)
    outs1, _ = h.hidden(W1, only(outs0, Forward, W1).msg)
    outs2 = h.token(W2, only(outs1, Forward, W2).msg, token_id)
    nxt = of(outs2, Forward) or of(outs2, Token)
    return outs0, outs1, frame, nxt[0]


def test_decode_steps_send_hop_1s_input_to_hop_2s_worker() -> None:
    h = three_hops(Harness(speculate=(("base", 0.25),)))
    fwd0 = only(h.generate(max_new_tokens=3), Forward, W0)
    outs0, outs1, _frame, fwd0 = step(h, fwd0, 10)  # the prefill: no speculation
    assert not of(outs0 + outs1, Speculate)
    for _ in range(2):  # two decode steps
        outs0, outs1, frame, nxt = step(h, fwd0, 11)
        fwd1 = only(outs0, Forward, W1)
        spec = only(outs0, Speculate)
        assert spec.peer == W2
        assert spec.frames == fwd1.frames == (frame,)
        assert spec.frames[0] is frame  # the received frame object itself, passed through
        msg = spec.msg
        assert msg.stage_keys == (stage_key(BASE, 4, 6),)
        assert (msg.request_id, msg.step, msg.past_len) == (
            fwd1.msg.request_id,
            fwd1.msg.step,
            fwd1.msg.past_len,
        )
        assert msg.max_total_len == fwd1.msg.max_total_len
        assert msg.tolerance == 0.25 and msg.tensors == HIDDEN
        assert not of(outs1, Speculate), "the last hop has no next hop"
        fwd0 = nxt
    assert h.broker.counters["speculated"] == 2


def test_only_models_that_speculate() -> None:
    h = three_hops(Harness(speculate=(("ft", 0.0),)))
    fwd0 = only(h.generate(max_new_tokens=3), Forward, W0)
    for _ in range(3):
        outs0, outs1, _frame, fwd0 = step(h, fwd0, 11)
        assert not of(outs0 + outs1, Speculate)
    assert h.broker.counters["speculated"] == 0


def test_off_by_default() -> None:
    h = three_hops(Harness())
    fwd0 = only(h.generate(max_new_tokens=3), Forward, W0)
    for _ in range(3):
        outs0, outs1, _frame, fwd0 = step(h, fwd0, 11)
        assert not of(outs0 + outs1, Speculate)
    assert h.broker.counters["speculated"] == 0


def test_two_hops_have_nothing_to_speculate() -> None:
    """Hop 1 is the last hop: there is no hop 2 to predict for."""
    h = Harness(speculate=(("base", 0.0),))
    h.ready(W0, [("base", 0, 3)])
    h.ready(W1, [("base", 3, 4), ("base", 4, 6)])
    fwd0 = only(h.generate(max_new_tokens=3), Forward, W0)
    for _ in range(3):
        outs0, _frame = h.hidden(W0, fwd0.msg)
        assert not of(outs0, Speculate)
        outs1 = h.token(W1, only(outs0, Forward, W1).msg, 11)
        nxt = of(outs1, Forward) or of(outs1, Token)
        fwd0 = nxt[0]
    assert h.broker.counters["speculated"] == 0


def test_a_step_of_several_positions_is_not_speculated() -> None:
    """A prefill after a replay or a move sends [T, D] to hop 1: not a decode step."""
    h = three_hops(Harness(speculate=(("base", 0.0),)))
    fwd0 = only(h.generate(max_new_tokens=3), Forward, W0)
    _outs0, _outs1, _frame, fwd0 = step(h, fwd0, 11)  # prefill over: a decode step now
    wide = (TensorMeta("float32", (3, 64)),)
    outs = h.send(W0, Result(fwd0.msg.request_id, fwd0.msg.step, tensors=wide), (object(),))
    assert of(outs, Forward) and not of(outs, Speculate)


def test_tolerances_are_checked() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        BrokerConfig(speculate=(("base", -0.1),))
    cfg = BrokerConfig(speculate=(("base", 0.0),))
    assert cfg.speculation_tolerance("base") == 0.0
    assert cfg.speculation_tolerance("ft") is None


def test_cli_flag_parses_model_tolerance_pairs() -> None:
    import click

    from blockllm.client.cli.process_config import broker_config as _broker_config
    from blockllm.client.cli.process_config import speculate_pairs as _speculate

    assert _broker_config({"speculate": ("base=0", "ft=0.2")}).speculate == (
        ("base", 0.0),
        ("ft", 0.2),
    )
    assert _broker_config({}).speculate == ()
    for bad in ("base", "base=-1", "=0.1", "base=x"):
        with pytest.raises(click.BadParameter):
            _speculate([bad])
