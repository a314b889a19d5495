"""STATS kept between snapshots (broker/stats.py StatsEntries, Metrics.cached_stats) and
published from kept bytes (broker/stats_delta.py, broker/stats_wire.py) is exact: over a
random trace of state changes (workers come, go, get banned and re-register, requests start,
step and finish, the planner sets routes and unloads stages, time passes windows), at every
step the broker's body equals a body built afresh, the frames equal `frames.encode`'s, and
what a subscriber rebuilds from the full STATS and the deltas after it (through the codec)
equals the fresh body. A cache that misses a change fails it (the last tests)."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from blockllm.broker import frames
from blockllm.broker import stats as stats_module
from blockllm.broker.protocol import (
    Dead,
    Error,
    Forward,
    Heartbeat,
    PlannedHop,
    PlannedRoute,
    SetRoutes,
    Stats,
    UnloadStage,
)
from blockllm.broker.shown import ShownRoutes
from blockllm.broker.stats import Metrics, stats_body
from blockllm.broker.stats_delta import DeltaPublisher, StatsView
from blockllm.zoo.chain import stage_key
from tests.unit.broker_harness import BASE, CHAIN, EOS, FT, W0, W1, W2, Harness

PLANNER = b"planner"
PEERS = (W0, W1, W2, b"w3")
LAYOUTS = (
    [("base", 0, 6)],
    [("base", 0, 3), ("ft", 3, 6)],
    [("base", 3, 6)],
    [("base", 0, 3)],
    [("ft", 0, 6)],
    [("base", 0, 3), ("base", 3, 6), ("ft", 0, 6)],
)
HEADS = {stage_key(m, s, CHAIN) for m in (BASE, FT) for s in range(CHAIN)}
HOPS = (  # planned routes are 1-2 of these, each a whole chain
    (("w0", ((0, 6),)),),
    (("w2", ((0, 6),)),),
    (("w1", ((0, 3),)), ("w0", ((3, 6),))),
    (("w3", ((0, 3),)), ("w2", ((3, 6),))),
    (("w1", ((0, 3), (3, 6))),),
    (("w3", ((0, 3), (3, 6))),),
)


def planned(rng: random.Random) -> tuple[PlannedRoute, ...]:
    hops = rng.sample(HOPS, rng.choice([1, 1, 2]))
    return tuple(
        PlannedRoute(tuple(PlannedHop(w, spans) for w, spans in h), rng.choice([1.0, 2.0]))
        for h in hops
    )


def fresh(h: Harness) -> Any:
    """The body built from scratch: no kept routes, entries or metrics."""
    b = h.broker.state
    return stats_body(b, h.broker.flow.route, h.now, ShownRoutes(scratch=True))


def decoded(msg: Any) -> Any:
    return frames.decode(frames.encode(msg))[0]


def step(h: Harness, rng: random.Random, pending: list[Any], n: int) -> None:
    """One random change of the broker's state (`pending`: FORWARDs not answered yet)."""
    op = rng.random()
    peer = rng.choice(PEERS)
    if op < 0.12:
        outs = h.ready(peer, rng.choice(LAYOUTS), slots=rng.choice([1, 4, 8]))
    elif op < 0.35:
        outs = h.generate(f"r{n}", rng.choice(["base", "ft"]), max_new_tokens=rng.randrange(1, 5))
    elif op < 0.65 and pending:
        out = pending.pop(rng.randrange(len(pending)))
        fwd = out.msg
        if rng.random() < 0.1:
            outs = h.send(out.peer, Error(fwd.request_id, "CACHE_FULL", "full", True, fwd.step))
        elif fwd.stage_keys[-1] in HEADS:
            outs = h.token(out.peer, fwd, rng.choice([EOS, 7, 8]))
        else:
            outs = h.hidden(out.peer, fwd)[0]
    elif op < 0.72:
        routes = {m: planned(rng) for m in ("base", "ft") if rng.random() < 0.8}
        outs = h.send(PLANNER, SetRoutes(f"c{n}", routes, rng.random() < 0.3))
    elif op < 0.76:
        m = rng.choice([BASE, FT])
        s, e = rng.choice([(0, 6), (0, 3), (3, 6)])
        outs = h.send(PLANNER, UnloadStage(stage_key(m, s, e), peer.decode(), f"u{n}", 1.0))
    elif op < 0.78:
        outs = h.send(peer, Dead("gone"))
    elif op < 0.88:
        beat = Heartbeat(free_slots=rng.randrange(8), steps=n, step_ms_p50=rng.choice([0, 5.0]))
        outs = h.send(peer, beat)
    else:
        outs = h.tick(rng.choice([0.0, 0.01, 0.1, 0.3, 1.0, 4.0]))
    for w in list(h.broker.workers):  # most workers stay alive
        if rng.random() < 0.8:
            outs += h.send(w, Heartbeat(free_slots=rng.randrange(1, 8), steps=n))
    pending += [o for o in outs if isinstance(o.msg, Forward)]


def run_trace(seed: int, steps: int, full_every: int, part_bytes: int = 1 << 19) -> int:
    """The trace (module docstring); returns the deltas applied. AssertionError on the first
    step where something differs."""
    rng = random.Random(seed)
    h = Harness()
    pub, view = DeltaPublisher(full_every, part_bytes), StatsView()
    pending: list[Any] = []
    applied = 0
    for n in range(1, steps + 1):
        for _ in range(rng.choice([1, 1, 2, 5])):
            step(h, rng, pending, n)
        h.now += rng.choice([0.0, 0.01, 0.05, 0.2, 0.5, 1.0])
        body = h.broker.stats(h.now)
        expected = fresh(h)
        assert body == expected, f"step {n}: the kept entries differ from a fresh build"
        got = None
        for msg, wire in pub.publish(n, body):
            assert wire == frames.encode(msg), f"step {n}: the frames differ from encode's"
            msg = frames.decode(wire)[0]
            if isinstance(msg, Stats):
                got = view.full(msg)
            else:
                got = view.apply(msg)
                applied += 1
        assert got == decoded(Stats(n, expected)).body, f"step {n}: the subscriber differs"
    return applied


@pytest.mark.parametrize(("seed", "full_every"), [(1, 7), (2, 3), (3, 25)])
def test_a_subscriber_of_the_deltas_holds_a_fresh_full_build_at_every_step(
    seed: int, full_every: int
) -> None:
    assert run_trace(seed, 300, full_every) > 100


def test_in_parts_too() -> None:
    """Full snapshots in parts, deltas past the bound replaced by full ones."""
    assert run_trace(4, 150, 9, part_bytes=700) > 0


def test_cached_metrics_equal_the_plain_computation_on_random_samples() -> None:
    rng = random.Random(5)
    metrics = Metrics(window_s=rng.choice([2.0, 20.0]), rate_window_s=1.0)
    now = 0.0
    for _ in range(3000):
        now += rng.choice([0.0, 0.001, 0.1, 0.5, 1.0, 3.0])
        model = rng.choice("abc")
        op = rng.random()
        if op < 0.3:
            metrics.on_request(model, now)
        elif op < 0.7:
            last = rng.choice([0.0, now - rng.random()])
            metrics.on_token(model, now, now - rng.random(), last)
        elif op < 0.75:
            metrics.on_complete(model)
        for m in "abcd":
            assert metrics.cached_stats(m, now) == metrics.model_stats(m, now)


def test_the_trace_fails_when_the_metrics_cache_ignores_the_window(monkeypatch) -> None:
    """The trace above can fail: metrics kept while samples leave their window are found."""

    def stale(self: Metrics, model: str, now: float) -> dict[str, Any]:
        m = self.models.get(model)
        if m is not None and m.cached is not None and m.cached[0] == m.version:
            return m.cached[4]  # no window check
        out = self.model_stats(model, now)
        if m is not None:
            m.cached = (m.version, now, math.inf, math.inf, out)
        return out

    monkeypatch.setattr(Metrics, "cached_stats", stale)
    with pytest.raises(AssertionError, match="kept entries differ"):
        run_trace(1, 300, 7)


def test_the_trace_fails_when_a_kept_entry_outlives_its_change(monkeypatch) -> None:
    """... and an entry kept though its requests changed."""
    real = stats_module.StatsEntries._model

    def sticky(self: Any, b: Any, route_of: Any, name: str, now: float, shown: Any) -> Any:
        kept = self._models.get(name)
        entry = real(self, b, route_of, name, now, shown)
        return kept[1] if kept is not None and kept[1].running != entry.running else entry

    monkeypatch.setattr(stats_module.StatsEntries, "_model", sticky)
    with pytest.raises(AssertionError, match="kept entries differ"):
        run_trace(1, 300, 7)


def test_the_trace_fails_when_a_full_stats_packs_stale_bytes(monkeypatch) -> None:
    """... and a full STATS packed from bytes kept by name alone."""
    from blockllm.broker.stats_wire import Packed

    def by_name(self: Packed, name: str, entry: Any) -> bytes:
        cached = self._by_name.get(name)
        if cached is not None:
            return cached[1]
        data = self._fn(name, entry)
        self._by_name[name] = (entry, data)
        return data

    monkeypatch.setattr(Packed, "get", by_name)
    with pytest.raises(AssertionError, match="frames differ"):
        run_trace(1, 300, 3)
