"""The pure Broker state machine driven with real protocol messages: no sockets, no sleeps.

Peers are fake ROUTER identities; time is a number the test advances. Stage keys come from the
worker's own `stage_key`, so routing matches what real workers advertise.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from typing import Any

import pytest

from blockllm.broker.broker import Broker, Out
from blockllm.broker.config import BrokerConfig
from blockllm.broker.models import ModelSpec
from blockllm.broker.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Dead,
    Error,
    ErrorCode,
    Forward,
    Generate,
    Heartbeat,
    Ready,
    Release,
    Result,
    StageRef,
    Status,
    StatusRequest,
    TensorMeta,
    Token,
)
from blockllm.zoo import ModelManifest
from blockllm.zoo.chain import stage_key

LAYERS = 4
CHAIN = LAYERS + 2
VOCAB = 384
EOS = 1
W0, W1, W2, CLIENT = b"w0", b"w1", b"w2", b"client"
HIDDEN = (TensorMeta("float32", (1, 64)),)  # a decode step's hidden state


def hidden_of(tokens: int) -> tuple[TensorMeta, ...]:
    return (TensorMeta("float32", (tokens, 64)),)


def manifest(name: str, changed: dict[int, str] | None = None) -> ModelManifest:
    chain = ["e" * 64, *(f"{i:064x}" for i in range(LAYERS)), "f" * 64]
    for pos, bid in (changed or {}).items():
        chain[pos] = bid
    config = {"vocab_size": VOCAB, "max_position_embeddings": 64, "num_attention_heads": 4}
    config |= {"num_key_value_heads": 2, "hidden_size": 64}
    return ModelManifest(
        name=name,
        model_type="llama",
        config=config,
        chain=tuple(chain),
        tie_word_embeddings=False,
        dtype="float32",
        generation={"eos_token_id": EOS},
        fingerprint="fam",
    )


def spec(m: ModelManifest, tokenizer: Any = None) -> ModelSpec:
    return ModelSpec(
        name=m.name,
        chain_len=len(m.chain),
        vocab_size=VOCAB,
        max_positions=64,
        eos_ids=frozenset({EOS}),
        kv_bytes_per_token_layer=512,
        tokenizer=tokenizer,
        manifest=m,
    )


BASE = manifest("base")
FT = manifest("ft", {3: "a" * 64})  # layer 2 fine-tuned


class Harness:
    """A Broker, a clock, and helpers that speak the protocol to it."""

    def __init__(self, tokenizer: Any = None, **cfg: Any) -> None:
        self.now = 100.0
        self.cfg = BrokerConfig(**{"default_timeout_s": 30.0, **cfg})
        models = {"base": spec(BASE, tokenizer), "ft": spec(FT, tokenizer)}
        self.broker = Broker(self.cfg, lambda: models, stage_key, now=self.now)

    def send(self, peer: bytes, msg: Any, frames: tuple = ()) -> list[Out]:
        return self.broker.handle(peer, msg, frames, self.now)

    def tick(self, dt: float = 0.0) -> list[Out]:
        self.now += dt
        return self.broker.tick(self.now)

    def ready(self, peer: bytes, spans: list[tuple[str, int, int]], slots: int = 8, **kw) -> list:
        m = {"base": BASE, "ft": FT}
        stages = tuple(StageRef(stage_key(m[n], s, e), n, s, e) for n, s, e in spans)
        msg = Ready(PROTOCOL_VERSION, peer.decode(), 1000 + peer[-1], "host", "cpu", stages)
        facts = {"free_slots": slots, "kv_total_bytes": 1 << 30, "kv_free_bytes": 1 << 30}
        msg = replace(msg, **(facts | kw))
        return self.send(peer, msg)

    def generate(self, rid: str = "r1", model: str = "base", **kw) -> list[Out]:
        kw.setdefault("input_ids", (5, 6, 7))
        return self.send(CLIENT, Generate(rid, model, **kw))

    def hidden(self, peer: bytes, fwd: Forward) -> tuple[list[Out], object]:
        """A hidden-state RESULT [T, 64] answering `fwd` (T: its input's positions)."""
        frame = object()  # stands in for a zmq.Frame: the broker must pass it on untouched
        metas = hidden_of(fwd.tensors[0].shape[0])
        return self.send(peer, Result(fwd.request_id, fwd.step, tensors=metas), (frame,)), frame

    def token(self, peer: bytes, fwd: Forward, token_id: int) -> list[Out]:
        return self.send(peer, Result(fwd.request_id, fwd.step, token_id=token_id))


def ids_of(out: Out) -> list[int]:
    (frame,) = out.frames
    return list(struct.unpack(f"<{len(frame) // 8}q", frame))


def only(outs: list[Out], kind: type, peer: bytes | None = None) -> Out:
    found = [o for o in outs if isinstance(o.msg, kind) and (peer is None or o.peer == peer)]
    assert len(found) == 1, outs
    return found[0]


def of(outs: list[Out], kind: type) -> list[Out]:
    return [o for o in outs if isinstance(o.msg, kind)]


@pytest.fixture
def h() -> Harness:
    return Harness()


@pytest.fixture
def split(h: Harness) -> Harness:
    """Two workers: w0 hosts embed + layers 0..1, w1 layers 2..3 + head (both models)."""
    h.ready(W0, [("base", 0, 3)])
    h.ready(W1, [("base", 3, 4), ("ft", 3, 4), ("base", 4, 6)])
    return h


def run_step(h: Harness, fwd0: Out, token_id: int) -> list[Out]:
    """Hop 0 -> hop 1 -> token; returns what the token produced."""
    outs, _ = h.hidden(W0, fwd0.msg)
    return h.token(W1, only(outs, Forward, W1).msg, token_id)


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


def test_status_body_shape(split: Harness) -> None:
    split.generate("r1")
    body = only(split.send(CLIENT, StatusRequest("s1")), Status).msg.body
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
    assert split.broker.status(split.now)["models"]["ft"]["route"] is None


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
