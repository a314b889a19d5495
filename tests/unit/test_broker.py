"""The pure Broker state machine driven with real protocol messages: no sockets, no sleeps.

Peers are fake ROUTER identities; time is a number the test advances. Stage keys come from the
worker's own `stage_key`, so routing matches what real workers advertise.
"""

from __future__ import annotations

import pytest

from blockllm.broker.protocol import (
    PROTOCOL_VERSION,
    Error,
    ErrorCode,
    Forward,
    PlannedHop,
    Ready,
    Release,
    Result,
    Status,
    StatusRequest,
    TensorMeta,
    Token,
    plain,
)
from blockllm.zoo.chain import stage_key
from tests.unit.broker_harness import (
    BASE,
    CLIENT,
    EOS,
    FT,
    LAYERS,
    VOCAB,
    W0,
    W1,
    Harness,
    hidden_of,
    ids_of,
    of,
    only,
    run_step,
)

# -- registration ----------------------------------------------------------------------------


def test_ready_registers_worker(h: Harness) -> None:
    assert h.ready(W0, [("base", 0, 6)]) == []
    w = h.broker.workers[W0]
    assert (w.name, w.pid, w.free_slots) == ("w0", 1048, 8)
    assert [s.start for s in w.stages] == [0]


def test_ready_with_wrong_protocol_version_is_refused(h: Harness) -> None:
    out = h.send(W0, Ready(PROTOCOL_VERSION + 1, "w0", 1, "host", "cpu"))
    assert only(out, Error).msg.code == ErrorCode.PROTOCOL_VERSION.value
    assert W0 not in h.broker.workers


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"model": "nope"}, ErrorCode.UNKNOWN_MODEL),
        ({"input_ids": ()}, ErrorCode.BAD_REQUEST),
        ({"input_ids": None, "prompt": ""}, ErrorCode.BAD_REQUEST),
        ({"input_ids": None, "prompt": "text but no tokenizer"}, ErrorCode.BAD_REQUEST),
        ({"prompt": "both"}, ErrorCode.BAD_REQUEST),
        ({"input_ids": (5, VOCAB)}, ErrorCode.BAD_REQUEST),
        ({"input_ids": (-1,)}, ErrorCode.BAD_REQUEST),
        ({"input_ids": tuple(range(10)), "max_new_tokens": 55}, ErrorCode.BAD_REQUEST),
        ({"max_new_tokens": 0}, ErrorCode.BAD_REQUEST),
        ({"max_new_tokens": 41}, ErrorCode.BAD_REQUEST),
        ({"temperature": -0.1}, ErrorCode.BAD_REQUEST),
        ({"temperature": float("nan")}, ErrorCode.BAD_REQUEST),
        ({"top_p": 0.0}, ErrorCode.BAD_REQUEST),
        ({"top_p": 1.5}, ErrorCode.BAD_REQUEST),
        ({"top_k": -1}, ErrorCode.BAD_REQUEST),
        ({"timeout_s": -1.0}, ErrorCode.BAD_REQUEST),
        ({"input_ids": tuple(range(2, 22))}, ErrorCode.BAD_REQUEST),  # > max_prompt_tokens
        ({"resume_ids": (9, 9, 9, 9)}, ErrorCode.BAD_REQUEST),  # >= max_new_tokens
        ({"resume_ids": (EOS,)}, ErrorCode.BAD_REQUEST),
    ],
)
def test_validation_errors(kw: dict, code: ErrorCode) -> None:
    h = Harness(max_new_tokens_limit=40, max_prompt_tokens=16)
    kw.setdefault("max_new_tokens", 4)
    out = h.generate("bad", **kw)
    err = only(out, Error).msg
    assert (err.request_id, err.code) == ("bad", code.value), err
    assert not h.broker.requests


def test_duplicate_request_id_is_refused(split: Harness) -> None:
    split.generate("r1")
    err = only(split.generate("r1"), Error).msg
    assert err.code == ErrorCode.BAD_REQUEST.value
    assert len(split.broker.requests) == 1


# -- the request flow ------------------------------------------------------------------------


def test_routes_across_two_workers_and_streams_tokens(split: Harness) -> None:
    h = split
    fwd0 = only(h.generate("r1", max_new_tokens=3), Forward, W0)
    assert ids_of(fwd0) == [5, 6, 7]
    assert (fwd0.msg.past_len, fwd0.msg.max_total_len, fwd0.msg.step) == (0, 6, 1)
    assert fwd0.msg.stage_keys == (stage_key(BASE, 0, 3),)
    outs, frame = h.hidden(W0, fwd0.msg)
    fwd1 = only(outs, Forward, W1)
    assert fwd1.frames[0] is frame, "the tensor frame is forwarded as received"
    assert fwd1.msg.tensors == hidden_of(3) and fwd1.msg.past_len == 0
    assert fwd1.msg.stage_keys == (stage_key(BASE, 3, 4), stage_key(BASE, 4, 6))
    outs = h.token(W1, fwd1.msg, 42)
    tok = only(outs, Token, CLIENT).msg
    assert (tok.request_id, tok.index, tok.token_id, tok.finish_reason) == ("r1", 0, 42, None)
    assert tok.prompt_tokens == 3
    nxt = only(outs, Forward, W0)
    assert ids_of(nxt) == [42] and nxt.msg.past_len == 3 and nxt.msg.step == 2


def test_fine_tune_takes_its_own_stage(split: Harness) -> None:
    fwd0 = only(split.generate("r1", model="ft"), Forward, W0)
    outs, _ = split.hidden(W0, fwd0.msg)
    assert only(outs, Forward, W1).msg.stage_keys == (
        stage_key(FT, 3, 4),
        stage_key(FT, 4, 6),
    )
    assert stage_key(FT, 4, 6) == stage_key(BASE, 4, 6)  # the shared tail is one stage


def test_finish_at_eos_releases_every_hop(split: Harness) -> None:
    fwd = only(split.generate("r1", max_new_tokens=8), Forward, W0)
    outs = run_step(split, fwd, 42)
    outs = run_step(split, only(outs, Forward, W0), EOS)
    tok = only(outs, Token).msg
    assert (tok.index, tok.token_id, tok.finish_reason, tok.text) == (1, EOS, "stop", "")
    assert {o.peer for o in of(outs, Release)} == {W0, W1}
    assert not of(outs, Forward)
    assert not split.broker.requests
    assert all(not w.inflight for w in split.broker.workers.values())


def test_finish_at_max_new_tokens(split: Harness) -> None:
    outs = split.generate("r1", max_new_tokens=2)
    toks = []
    for t in (40, 41):
        outs = run_step(split, only(outs, Forward, W0), t)
        toks.append(only(outs, Token).msg)
    assert [t.finish_reason for t in toks] == [None, "length"]
    assert len(of(outs, Release)) == 2
    assert split.broker.counters["completed"] == 1


def test_text_is_detokenized_incrementally() -> None:
    from blockllm.zoo.tiny import build_tokenizer

    tok = build_tokenizer()
    h = Harness(tokenizer=tok)
    h.ready(W0, [("base", 0, 6)])
    answer = tok("héllo 日本").input_ids
    outs = h.generate("r1", input_ids=None, prompt="Hi", max_new_tokens=len(answer) + 1)
    assert ids_of(only(outs, Forward)) == tok("Hi").input_ids
    texts = []
    for t in [*answer, EOS]:
        outs = h.token(W0, only(outs, Forward).msg, t)
        texts.append(only(outs, Token).msg.text)
    assert "".join(texts) == "héllo 日本"
    assert "" in texts[:-1]  # a token inside a multi-byte character


def test_status_body_shape(split: Harness) -> None:
    split.generate("r1")
    typed = only(split.send(CLIENT, StatusRequest("s1")), Status).msg.body
    assert typed.models["base"].route == (
        PlannedHop("w0", ((0, 3),)),
        PlannedHop("w1", ((3, 4), (4, 6))),
    )
    body = plain(typed)  # the shape `blockllm status --json` shows (and always showed)
    top = {"workers", "models", "requests", "counters", "stats_endpoint", "totals", "timings"}
    assert set(body) == top | {"page"}
    assert body["page"] == {"offset": 0, "limit": 128, "next": 0}  # one page holds it all
    w = body["workers"][0]
    for key in ("name", "pid", "host", "device", "stages", "queue_depths", "kv_free_bytes"):
        assert key in w
    assert {"kv_total_bytes", "free_slots", "rss_bytes", "alive", "step_ms_p50"} <= set(w)
    assert w["stages"][0] == {
        "key": stage_key(BASE, 0, 3),
        "model": "base",
        "start": 0,
        "end": 3,
        "nbytes": 0,
        "dtype": "",  # the harness's worker does not say
    }
    assert w["kv_geometries"] == []
    base = body["models"]["base"]
    assert base == {
        "layers": LAYERS,
        "chain_len": LAYERS + 2,
        "covered": True,
        "uncovered": "",
        "route": [["w0", [[0, 3]]], ["w1", [[3, 4], [4, 6]]]],
        "running": 1,
        "waiting": 0,
        "planned_routes": [],
        "substitutions": [],
    }
    assert body["requests"] == {"running": 1, "waiting": 0}
    assert body["counters"]["requests"] == 1 and "bad_messages" in body["counters"]
    del split.broker.workers[W1]
    assert split.broker.status(split.now).models["ft"].route is None


def test_shutdown_fails_uncovered_waiting_and_refuses_new(h: Harness) -> None:
    h.generate("r1")  # no worker covers "base": it cannot run in the drain
    outs = h.broker.begin_shutdown(h.now)
    err = only(outs, Error).msg
    assert err.code == ErrorCode.SHUTTING_DOWN.value and err.retryable  # the client resumes
    assert only(h.generate("r2"), Error).msg.code == ErrorCode.SHUTTING_DOWN.value
    assert h.broker.idle


def test_shutdown_drains_accepted_requests_waiting_for_credit(h: Harness) -> None:
    h.ready(W0, [("base", 0, 6)], slots=1)
    fwd = only(h.generate("r1", max_new_tokens=1), Forward, W0)
    assert h.generate("r2", max_new_tokens=1) == [], "no credit: r2 waits"
    assert h.broker.begin_shutdown(h.now) == [], "accepted r2 is not failed"
    assert only(h.generate("r3"), Error).msg.code == ErrorCode.SHUTTING_DOWN.value
    outs = h.token(W0, fwd.msg, 42)  # r1 finishes, its slot goes to r2
    assert ids_of(only(outs, Forward, W0)) == [5, 6, 7]
    assert not h.broker.idle
    r2 = only(outs, Forward, W0).msg
    assert only(h.token(W0, r2, 43), Token).msg.finish_reason == "length"
    assert h.broker.idle


def test_zoo_catalog_reads_models(tiny_checkpoint, tmp_path) -> None:
    from blockllm.broker.models import ZooCatalog
    from blockllm.zoo import Zoo

    Zoo(tmp_path).import_checkpoint(tiny_checkpoint("llama"), "tiny")
    specs = ZooCatalog(tmp_path, eos_fallback=7)()
    s = specs["tiny"]
    assert (s.chain_len, s.vocab_size, s.eos_ids) == (LAYERS + 2, VOCAB, frozenset({EOS}))
    assert s.kv_bytes_per_token_layer == 2 * 2 * 16 * 4  # K and V, 2 kv heads x 16, fp32
    assert s.tokenizer("hello").input_ids
    assert stage_key(s.manifest, 0, 3) == stage_key(Zoo(tmp_path).manifest("tiny"), 0, 3)


@pytest.mark.parametrize(
    "meta",
    [
        TensorMeta("float32", (3, 65)),  # not the model's hidden size
        TensorMeta("float32", (1, 64)),  # not the step's token count (a 3-token prefill)
        TensorMeta("float32", (0, 64)),
        TensorMeta("int64", (3, 64)),
        TensorMeta("float32", (3, 64, 1)),
    ],
)
def test_a_mid_route_result_with_hostile_metadata_is_not_forwarded(
    split: Harness, meta: TensorMeta
) -> None:
    fwd0 = only(split.generate("b1"), Forward, W0).msg
    before = split.broker.counters["bad_messages"]
    outs = split.send(W0, Result(fwd0.request_id, fwd0.step, tensors=(meta,)), (object(),))
    assert not [o for o in outs if isinstance(o.msg, Forward) and o.peer == W1], outs
    assert split.broker.counters["bad_messages"] == before + 1
