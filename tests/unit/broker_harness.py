"""The broker unit tests' harness: the pure Broker state machine with a clock the test
advances, two models (a base and a fine-tune of layer 2) whose stage keys come from the
worker's own `stage_key`, fake ROUTER identities as peers, and helpers that speak the protocol.
Its fixtures (`h`, `split`) live in tests/unit/conftest.py.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from typing import Any

from blockllm.broker.broker import Broker, Out
from blockllm.broker.config import BrokerConfig
from blockllm.broker.models import ModelSpec
from blockllm.broker.protocol import (
    PROTOCOL_VERSION,
    Forward,
    Generate,
    Ready,
    Result,
    StageRef,
    TensorMeta,
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


def run_step(h: Harness, fwd0: Out, token_id: int) -> list[Out]:
    """Hop 0 -> hop 1 -> token; returns what the token produced."""
    outs, _ = h.hidden(W0, fwd0.msg)
    return h.token(W1, only(outs, Forward, W1).msg, token_id)
