"""Waiting requests are retried only when something relevant to them changed: a routed message
costs no route attempts however many models wait, and a worker that may take work, a ban that
ends or a stage that appears wakes exactly the models waiting for it, oldest request first."""

from __future__ import annotations

from dataclasses import replace

from blockllm.broker.broker import Broker, Out
from blockllm.broker.config import BrokerConfig
from blockllm.broker.models import ModelSpec
from blockllm.broker.protocol import (
    PROTOCOL_VERSION,
    Forward,
    Generate,
    Heartbeat,
    Ready,
    Result,
    StageRef,
)
from blockllm.zoo import ModelManifest
from blockllm.zoo.chain import stage_key

LAYERS = 4
CHAIN = LAYERS + 2
W0, W1, W2, CLIENT = b"w0", b"w1", b"w2", b"client"
BUSY = [f"busy{i:02d}" for i in range(40)]  # hosted on W1, which has no free slot
ABSENT = [f"absent{i:02d}" for i in range(20)]  # hosted nowhere yet


def manifest(name: str, own: int | None) -> ModelManifest:
    chain = ["e" * 64, *(f"{i:064x}" for i in range(LAYERS)), "f" * 64]
    if own is not None:  # a fine-tune: its own layer 1
        chain[2] = f"{own + 100:064x}"
    config = {"vocab_size": 64, "max_position_embeddings": 64, "num_attention_heads": 4}
    config |= {"num_key_value_heads": 2, "hidden_size": 64}
    return ModelManifest(
        name=name,
        model_type="llama",
        config=config,
        chain=tuple(chain),
        tie_word_embeddings=False,
        dtype="float32",
        generation={"eos_token_id": 1},
        fingerprint="fam",
    )


MANIFESTS = {"base": manifest("base", None)}
MANIFESTS |= {n: manifest(n, i) for i, n in enumerate(BUSY + ABSENT)}


def spec(m: ModelManifest) -> ModelSpec:
    return ModelSpec(
        name=m.name,
        chain_len=CHAIN,
        vocab_size=64,
        max_positions=64,
        eos_ids=frozenset({1}),
        kv_bytes_per_token_layer=512,
        manifest=m,
    )


class Harness:
    def __init__(self) -> None:
        self.now = 100.0
        specs = {n: spec(m) for n, m in MANIFESTS.items()}
        self.broker = Broker(BrokerConfig(default_timeout_s=300.0), lambda: specs, stage_key)

    @property
    def tries(self) -> int:
        return self.broker.flow.tries

    def send(self, peer: bytes, msg) -> list[Out]:
        return self.broker.handle(peer, msg, (), self.now)

    def ready(self, peer: bytes, models: list[str], slots: int) -> list[Out]:
        stages = tuple(StageRef(stage_key(MANIFESTS[m], 0, CHAIN), m, 0, CHAIN) for m in models)
        msg = Ready(PROTOCOL_VERSION, peer.decode(), 1000 + peer[-1], "host", "cpu", stages)
        facts = {"free_slots": slots, "kv_total_bytes": 1 << 30, "kv_free_bytes": 1 << 30}
        return self.send(peer, replace(msg, **facts))

    def heartbeat(self, peer: bytes, slots: int) -> list[Out]:
        """What the worker reports: `slots` free, its KV less what runs there."""
        used = sum(self.broker.workers[peer].inflight.values())
        return self.send(peer, Heartbeat(free_slots=slots, kv_free_bytes=(1 << 30) - used))

    def generate(self, rid: str, model: str) -> list[Out]:
        return self.send(CLIENT, Generate(rid, model, input_ids=(5, 6, 7), max_new_tokens=8))


def forwards(outs: list[Out]) -> list[Out]:
    return [o for o in outs if isinstance(o.msg, Forward)]


def crowded() -> Harness:
    """base on W0 (free); 40 models on W1 (no free slot) and 20 hosted nowhere, one request
    of each waiting, in that order."""
    h = Harness()
    h.ready(W0, ["base"], slots=8)
    h.ready(W1, BUSY, slots=0)
    for name in BUSY + ABSENT:
        assert forwards(h.generate(f"r-{name}", name)) == []
    assert len(h.broker.waiting) == 60
    return h


def test_a_routed_message_tries_no_waiting_request() -> None:
    h = crowded()
    (fwd,) = forwards(h.generate("r-base", "base"))
    tries, messages = h.tries, 0
    for _ in range(6):  # decode steps of the running request: RESULT -> next FORWARD
        out = h.send(W0, Result(fwd.msg.request_id, fwd.msg.step, token_id=7))
        messages += 1
        (fwd,) = forwards(out)
        h.heartbeat(W1, slots=0)  # a report that frees nothing
        messages += 1
    # before: every message retried the 60 waiting requests (one route attempt per model)
    assert h.tries - tries == 0, (h.tries - tries) / messages
    assert len(h.broker.waiting) == 60


def test_a_worker_that_may_take_work_wakes_only_the_models_waiting_for_it() -> None:
    h = crowded()
    blocked = h.broker.waiting.blocked()
    assert all(blocked[m] == {W1} for m in BUSY)
    assert all(blocked[m] == frozenset() for m in ABSENT)
    tries = h.tries
    out = h.heartbeat(W1, slots=1)  # one slot: the oldest request waiting for W1 gets it
    assert [o.msg.request_id for o in forwards(out)] == [
        h.broker.state.by_client[(CLIENT, "r-busy00")]
    ]
    assert h.tries - tries == len(BUSY)  # each model waiting for W1 once, no other
    tries = h.tries
    h.heartbeat(W1, slots=0)  # it took that request: credit did not rise
    assert h.tries == tries
    # its release frees the slot again: the next oldest starts
    rid = h.broker.state.by_client[(CLIENT, "r-busy00")]
    h.broker.flow.finish(h.broker.requests[rid], None)
    out = h.send(W0, Heartbeat(free_slots=8, kv_free_bytes=1 << 30))  # any message dispatches
    assert [o.msg.request_id for o in forwards(out)] == [
        h.broker.state.by_client[(CLIENT, "r-busy01")]
    ]


def test_a_ban_that_ends_and_a_stage_that_appears_wake_their_models() -> None:
    h = crowded()
    w1 = h.broker.workers[W1]
    w1.ban(h.now, 1.0, 1.0)
    out = h.heartbeat(W1, slots=4)  # credit, but banned: still waiting
    assert forwards(out) == []
    tries = h.tries
    h.now += 0.5
    assert forwards(h.broker.tick(h.now)) == [] and h.tries == tries  # nothing changed yet
    h.now += 0.6
    out = h.broker.tick(h.now)  # the ban ended: the 4 oldest waiting for W1 start
    assert len(forwards(out)) == 4 and h.tries - tries == len(BUSY)
    tries = h.tries
    out = h.ready(W2, [ABSENT[3]], slots=2)  # a stage for one of the models hosted nowhere
    (started,) = forwards(out)
    assert started.peer == W2
    assert started.msg.request_id == h.broker.state.by_client[(CLIENT, f"r-{ABSENT[3]}")]
    assert 0 < h.tries - tries <= len(BUSY) + len(ABSENT)  # its family's models, once each
    assert len(h.broker.waiting) == 60 - 5
