"""Waking waiting requests lazily (broker/stage_index.py: a stage that goes or drains drops
the cached edges of the models watching it without waking them, since a stage going gives no
model a route; a stage that comes wakes them, and the quietly dropped ones too): at every step
of a random trace no waiting request has a route that a plain scan of every worker finds, and
a stage going wakes no model."""

from __future__ import annotations

import random
from dataclasses import replace

from blockllm.broker.protocol import PROTOCOL_VERSION, Generate, Ready, StageRef
from blockllm.broker.routing import WorkerView, find_route
from blockllm.zoo.chain import stage_key
from tests.unit.test_broker_waiting import CHAIN, CLIENT, MANIFESTS, Harness

MODELS = sorted(MANIFESTS)[:12]


def ready(h: Harness, name: str, stages: list[tuple[str, int, int]]) -> None:
    refs = tuple(StageRef(stage_key(MANIFESTS[m], s, e), m, s, e) for m, s, e in stages)
    msg = Ready(PROTOCOL_VERSION, name, 7, "host", "cpu", refs)
    facts = {"free_slots": 10_000, "kv_total_bytes": 1 << 40, "kv_free_bytes": 1 << 40}
    h.send(name.encode(), replace(msg, **facts))


def random_stages(rng: random.Random) -> list[tuple[str, int, int]]:
    out = []
    for _ in range(rng.randrange(1, 3)):
        start = rng.randrange(0, CHAIN - 1)
        out.append((rng.choice(MODELS), start, rng.randrange(start + 1, CHAIN + 1)))
    return out


def scan_has_route(h: Harness, model: str) -> bool:
    b = h.broker
    views = {
        p: WorkerView(w.live_stages(), w.load(), not w.banned(h.now) and w.credit_slots() >= 1)
        for p, w in b.workers.items()
    }
    return find_route(model, CHAIN, views, b.state.key_of) is not None


def test_no_waiting_request_has_a_route_while_stages_come_go_and_drain() -> None:
    rng = random.Random(7)
    h = Harness()
    b = h.broker
    names = [f"w{i}" for i in range(6)]
    for name in names:
        ready(h, name, random_stages(rng))
    quiet = waited = 0
    for step in range(600):
        what = rng.random()
        peer = rng.choice(sorted(b.workers)) if b.workers else None
        w = b.workers.get(peer) if peer is not None else None
        went = False
        if what < 0.3:
            h.send(
                CLIENT,
                Generate(f"r{step}", rng.choice(MODELS), input_ids=(5, 6, 7), max_new_tokens=4),
            )
        elif what < 0.5 and w is not None and w.live_stages():  # a stage drains
            w.draining[rng.choice(w.live_stages()).key] = h.now + 1e9
            went = True
        elif what < 0.6 and w is not None and w.draining:  # ... and comes back
            del w.draining[rng.choice(sorted(w.draining))]
        elif what < 0.7 and peer is not None:  # a worker is lost
            b.peer_lost(peer, h.now)
            went = True
        elif what < 0.85 and w is not None and w.stages:  # a stage goes, maybe one comes
            stages = [(s.model, s.start, s.end) for s in w.stages]
            stages.pop(rng.randrange(len(stages)))
            went = rng.random() < 0.5
            ready(h, w.name, stages if went else stages + random_stages(rng)[:1])
        else:
            ready(h, rng.choice(names), random_stages(rng))
        tries = b.flow.tries
        b.tick(h.now)  # (dispatches what the change woke)
        if went:  # a stage going gives no waiting request a route: none is tried
            assert b.flow.tries == tries, step
            quiet += 1
        waiting = {b.requests[rid].model for rid in b.waiting}
        for model in waiting:
            assert not scan_has_route(h, model), (step, model)
        waited += len(waiting)
    assert quiet > 100 and waited > 1000, (quiet, waited)


def test_a_model_dropped_quietly_is_woken_by_a_stage_that_comes() -> None:
    """base waits (nothing serves its [2, end)); one of its two [0, 2) stages goes (its edges
    dropped quietly: no retry); a stage of its [2, end) comes over a span its family already
    has (another model's stage there): base is woken and starts."""
    h = Harness()
    b = h.broker
    other = sorted(m for m in MANIFESTS if m != "base")[0]
    ready(h, "w0", [("base", 0, 2)])
    ready(h, "w4", [("base", 0, 2)])
    ready(h, "w3", [(other, 2, CHAIN)])  # (the span is the family's: not a new one)
    h.send(CLIENT, Generate("r", "base", input_ids=(5, 6, 7), max_new_tokens=4))
    assert len(b.waiting) == 1
    tries = b.flow.tries
    ready(h, "w0", [])
    assert b.flow.tries == tries and len(b.waiting) == 1  # dropped quietly
    ready(h, "w1", [("base", 2, CHAIN)])
    assert len(b.waiting) == 0 and scan_has_route(h, "base")
