"""Bounded STATS (broker/stats_delta.py): what the planner rebuilds from a full STATS and the
STATS_DELTAs after it, through the wire codec, equals the body the broker built (typed
entries again); deltas carry only what changed; a subscriber that missed the full snapshot
waits for the next; a malformed delta is a ProtocolError. The bodies are written as
`blockllm status --json` shows them and typed (tests/unit/typed_bodies.py)."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from blockllm.broker import frames
from blockllm.broker.protocol import ModelStats, ProtocolError, Stats, StatsDelta, WorkerStatus
from blockllm.broker.stats_delta import DeltaPublisher, StatsView
from tests.unit.typed_bodies import stats


def wire(msg: Any) -> Any:
    decoded, _ = frames.decode(frames.encode(msg))
    return decoded


def worker(name: str, rng: random.Random) -> dict[str, Any]:
    return {
        "name": name,
        "stages": [
            {"key": f"k{rng.randrange(9)}", "model": "m", "start": 0, "end": rng.randrange(1, 9)}
        ],
        "queue_depths": {"k1": rng.randrange(3)},
        "steps": rng.randrange(1000),
        "step_ms_p50": rng.choice([0.0, 12.5]),
        "pinned": [],
    }


def model(rng: random.Random) -> dict[str, Any]:
    return {"covered": rng.random() < 0.9, "route": [["w0", [[0, 4]]]], "rate_rps": rng.random()}


def evolve(body: dict[str, Any], rng: random.Random, n: int) -> dict[str, Any]:
    workers = [dict(w) for w in body["workers"]]
    models = {k: dict(v) for k, v in body["models"].items()}
    for w in workers:
        if rng.random() < 0.3:
            w["steps"] += 1
        if rng.random() < 0.05:
            w["stages"] = worker(w["name"], rng)["stages"]
        if rng.random() < 0.03:
            w["pinned"] = [] if w["pinned"] else ["k1"]
    if rng.random() < 0.2 and workers:
        workers.pop(rng.randrange(len(workers)))
    if rng.random() < 0.2:
        workers.append(worker(f"n{n}", rng))
    if rng.random() < 0.1 and len(workers) > 1:
        i, j = rng.sample(range(len(workers)), 2)
        workers[i], workers[j] = workers[j], workers[i]
    for m in models.values():
        if rng.random() < 0.3:
            m["rate_rps"] = rng.random()
    if rng.random() < 0.2 and models:
        models.pop(rng.choice(sorted(models)))
    if rng.random() < 0.2:
        models[f"m{n}"] = model(rng)
    counters = {"tokens": body["counters"]["tokens"] + rng.randrange(5)}
    gen = body["catalog_gen"] + (rng.random() < 0.05)
    return {"workers": workers, "models": models, "counters": counters, "catalog_gen": gen}


@pytest.mark.parametrize("part_bytes", [1 << 20, 900])
def test_the_planner_rebuilds_every_body_even_when_it_drops_snapshots(part_bytes: int) -> None:
    """Through the codec, with snapshots dropped; with a small `part_bytes` the full bodies
    travel in parts and the deltas that grow past it become full ones."""
    rng = random.Random(3)
    body = {
        "workers": [worker(f"w{i}", rng) for i in range(6)],
        "models": {f"m{i}": model(rng) for i in range(10)},
        "counters": {"tokens": 0},
        "catalog_gen": 1,
    }
    pub, view, late = DeltaPublisher(5, part_bytes), StatsView(), StatsView()
    deltas = rebuilt = skips = fulls = 0
    received = -1  # the last full snapshot received whole
    for seq in range(1, 300):
        body = evolve(body, rng, seq)
        sent = pub.publish(seq, stats(body))
        expected = wire(Stats(seq, stats(body))).body  # the body as the wire carries it
        for msg_, frames_ in sent:
            assert len(frames_[1]) <= part_bytes  # parts within the bound (no entry is cut)
            assert frames_ == frames.encode(msg_)  # assembled from its entries' bytes
        if rng.random() < 0.3:
            continue  # this snapshot was dropped (the PUB socket keeps only a few)
        msgs = [wire(m) for m, _ in sent]
        if isinstance(msgs[0], Stats):
            fulls += len(msgs) > 1
            got = None
            for i, msg in enumerate(msgs):
                assert msg.parts == len(msgs) and msg.part == i
                got = view.full(msg)
                assert (got is None) == (i < len(msgs) - 1)
                if seq > 40:
                    late.full(msg)
            assert got == expected
            received = seq
            continue
        (msg,) = msgs
        deltas += 1
        skips += msg.base != received
        got = view.apply(msg)
        if got is not None:
            rebuilt += 1
            assert got == expected, seq
            assert list(got.models) == list(expected.models)
            assert all(isinstance(w, WorkerStatus) for w in got.workers)
            assert all(isinstance(m, ModelStats) for m in got.models.values())
        if seq <= 40:
            assert late.apply(msg) is None  # never got a full one: waits for the next
    assert deltas > 100 and rebuilt > 80
    assert view.skipped == skips  # only the deltas whose full snapshot was dropped
    assert (fulls > 10) == (part_bytes < 1000)  # in parts only when past part_bytes


STAGES = [{"key": "k" * 64, "model": "m", "start": i, "end": i + 1} for i in range(8)]


def test_a_delta_carries_only_what_changed() -> None:
    body = {
        "workers": [{"name": f"w{i}", "stages": STAGES, "steps": 0} for i in range(50)],
        "models": {f"m{i}": {"route": [["w0", [[0, 34]]]], "rate_rps": 0.0} for i in range(200)},
        "catalog_gen": 1,
    }
    pub = DeltaPublisher(full_every=10)
    full = pub.message(1, stats(body))
    assert isinstance(full, Stats)
    body["workers"][3] = {**body["workers"][3], "steps": 5}
    body["models"]["m7"] = {**body["models"]["m7"], "rate_rps": 1.5}
    delta = pub.message(2, stats(body))
    assert isinstance(delta, StatsDelta) and delta.base == 1
    assert delta.workers == {"w3": {"steps": 5}} and delta.models == {"m7": {"rate_rps": 1.5}}
    assert not (delta.gone_workers or delta.worker_order or delta.model_order)
    sizes = [len(frames.encode(m)[1]) for m in (full, delta)]
    assert sizes[1] * 50 < sizes[0]
    for seq in range(3, 11):
        assert isinstance(pub.message(seq, stats(body)), StatsDelta)
    full = pub.message(11, stats(body))
    assert isinstance(full, Stats)  # every full_every snapshots
    # a new catalog (a tenant arriving) is a delta: the new model whole, catalog_gen in summary
    view = StatsView()
    view.full(wire(full))
    body["models"]["m200"] = {"route": [["w1", [[0, 34]]]], "rate_rps": 0.5}
    arrived = {**body, "catalog_gen": 2}
    delta = pub.message(13, stats(arrived))
    assert isinstance(delta, StatsDelta) and delta.whole_models == ("m200",)
    assert delta.summary.catalog_gen == 2 and set(delta.models) == {"m200"}
    assert view.apply(wire(delta)) == wire(Stats(13, stats(arrived))).body


def test_a_delta_past_the_part_bound_is_sent_as_a_full_snapshot_in_parts() -> None:
    body = {
        "workers": [{"name": f"w{i}", "stages": STAGES, "steps": 0} for i in range(50)],
        "models": {},
        "catalog_gen": 1,
    }
    pub = DeltaPublisher(full_every=10, part_bytes=8 * 1024)
    first = pub.publish(1, stats(body))
    assert len(first) >= 3 and all(isinstance(m, Stats) for m, _ in first)
    body["workers"][0] = {**body["workers"][0], "steps": 1}
    (small,) = pub.publish(2, stats(body))
    assert isinstance(small[0], StatsDelta)
    other = [{**st, "key": "j" * 64} for st in STAGES]
    body["workers"] = [{**w, "stages": other} for w in body["workers"]]
    again = pub.publish(3, stats(body))  # every stage changed: the delta would pass the bound
    assert all(isinstance(m, Stats) and m.seq == 3 for m, _ in again) and len(again) >= 3
    view = StatsView()
    for m, _ in again:
        got = view.full(wire(m))
    assert got == wire(Stats(3, stats(body))).body


@pytest.mark.parametrize(
    "fields",
    [
        {"workers": {"w0": {"steps": "many"}}},  # a changed field of the wrong type
        {"workers": {"w0": {"stages": [["k", "m", 0]]}}},  # a stage without its end
        {"models": {"m0": {"route": [["w0", [[0, 1, 2]]]]}}},  # a span of three bounds
        {"workers": {"w9": {"steps": 1}}, "whole_workers": ("w9",)},  # new, without its name
        {"worker_order": ("w0", "nobody")},  # an order naming an entry it does not have
    ],
)
def test_a_malformed_delta_is_a_protocol_error(fields: dict[str, Any]) -> None:
    body = {"workers": [{"name": "w0"}], "models": {"m0": {}}, "catalog_gen": 1}
    pub, view = DeltaPublisher(full_every=10), StatsView()
    view.full(wire(pub.message(1, stats(body))))
    delta = pub.message(2, stats(body))
    bad = wire(dataclasses.replace(delta, **fields))
    with pytest.raises(ProtocolError):
        view.apply(bad)
    assert view.apply(wire(delta)) == stats(body)  # the good one still applies


def test_a_delta_within_an_eighth_of_the_bound_is_followed_by_a_full_one() -> None:
    """The next cumulative delta would likely pass the bound: a full one is sent at once
    instead of a delta built and thrown away."""
    body = {
        "workers": [{"name": f"w{i}", "stages": STAGES, "steps": 0} for i in range(50)],
        "models": {},
        "catalog_gen": 1,
    }
    changed = {**body, "workers": [{**w, "steps": 7} for w in body["workers"]]}
    probe = DeltaPublisher(full_every=100, part_bytes=1 << 20)
    probe.publish(1, stats(body))
    ((delta, frames_),) = probe.publish(2, stats(changed))
    assert isinstance(delta, StatsDelta)
    pub = DeltaPublisher(full_every=100, part_bytes=len(frames_[1]) + 8)
    pub.publish(1, stats(body))
    ((second, _),) = pub.publish(2, stats(changed))
    assert isinstance(second, StatsDelta)  # within the bound, and within an eighth of it
    assert all(isinstance(m, Stats) for m, _ in pub.publish(3, stats(changed)))
    ((fourth, _),) = pub.publish(4, stats(changed))
    assert isinstance(fourth, StatsDelta)  # nothing changed since that full one


@pytest.mark.parametrize("lost", [0, 1, -1])
def test_a_full_snapshot_missing_a_part_is_never_applied(lost: int) -> None:
    """Its parts carry their seq and count: a subscriber applies a full snapshot only with
    every part of that seq (StatsView.full); one missing a part (the PUB socket dropped it)
    leaves the view on its previous base, whose deltas it skips, until the next whole one."""
    body = {
        "workers": [{"name": f"w{i}", "stages": STAGES, "steps": 0} for i in range(50)],
        "models": {},
        "catalog_gen": 1,
    }
    pub, view = DeltaPublisher(full_every=3, part_bytes=8 * 1024), StatsView()
    bodies = []
    for seq in range(1, 8):
        body = {**body, "workers": [{**w, "steps": seq} for w in body["workers"]]}
        bodies.append(wire(Stats(seq, stats(body))).body)
        sent = [wire(m) for m, _ in pub.publish(seq, stats(body))]
        if seq == 4:  # a full one in parts: one part lost
            assert len(sent) >= 3 and all(isinstance(m, Stats) for m in sent)
            sent.pop(lost)
        got = [view.full(m) if isinstance(m, Stats) else view.apply(m) for m in sent]
        if seq < 4:
            assert got[-1] == bodies[-1]
        elif seq < 7:  # the full one of seq 4 and the deltas against it: nothing applied
            assert all(g is None for g in got) and view.base_seq == 1
        else:  # the next full one, whole
            assert isinstance(sent[0], Stats) and got[-1] == bodies[-1]
            assert all(g is None for g in got[:-1])
    assert view.skipped == 2
