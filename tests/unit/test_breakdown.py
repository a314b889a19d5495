"""The per-token breakdown's pieces: the compute loop's clock, the broker's view of a worker's
timings, the division into ms per decode token, and the heartbeat carrying them."""

from __future__ import annotations

from types import SimpleNamespace

from blockllm.broker import frames
from blockllm.broker.protocol import Heartbeat
from blockllm.broker.timings import Timings, difference
from blockllm.broker.workers import TIMINGS_MAX, clean_timings
from blockllm.client.bench.breakdown import BROKER_PHASES, WORKER_PHASES, per_token, table
from blockllm.worker.clock import StepClock


def test_step_clock_times_only_decode_items_from_their_arrival() -> None:
    arrived = {"a": 10.0, "b": 10.5}  # the IO thread's: decode FORWARDs ready at these times
    clock = StepClock(arrived)
    for rid in ("a", "b", "prefill"):  # "prefill" never arrived timed
        clock.on_submit(rid)
    assert arrived == {}
    results = [SimpleNamespace(request_id=r) for r in ("a", "b", "prefill")]
    timed = clock.on_step(11.0, 11.5, 0.4, results)  # a step of 0.5 s, 0.4 s in forwards
    assert timed == {"a", "b"}
    t = clock.timings.snapshot()
    assert t["queue_n"] == 2 and abs(t["queue_s"] - (1.0 + 0.5)) < 1e-9
    assert abs(t["compute_s"] - 0.8) < 1e-9  # each item spent the step's forwards
    assert abs(t["step_python_s"] - 0.2) < 1e-9
    assert t["steps"] == 1
    # answered once: a second step does not time them again
    assert clock.on_step(12.0, 12.1, 0.1, results) == set()


def test_broker_keeps_only_named_finite_numbers_of_a_workers_timings() -> None:
    bad = {"queue_s": 1.5, "queue_n": 3, 7: 1.0, "x": "y", "nan": float("nan"), "b": True}
    assert clean_timings(bad) == {"queue_s": 1.5, "queue_n": 3}
    assert clean_timings(["not", "a", "dict"]) == {}
    many = {f"p{i}_s": float(i) for i in range(TIMINGS_MAX * 2)}
    assert len(clean_timings(many)) == TIMINGS_MAX


def test_heartbeat_carries_timings_and_an_old_one_decodes_without() -> None:
    hb = Heartbeat(free_slots=2, timings={"queue_s": 0.25, "queue_n": 4})
    back, _views = frames.decode(frames.encode(hb))
    assert back.timings == {"queue_s": 0.25, "queue_n": 4}
    old, _ = frames.decode(frames.encode(Heartbeat(free_slots=2)))
    assert old.timings == {}


def _sums(**phases: float) -> dict[str, float]:
    t = Timings()
    for phase, seconds in phases.items():
        t.add(phase, seconds, 10)
    return t.snapshot()


def test_per_token_divides_the_runs_differences_by_its_decode_tokens() -> None:
    before = {"workers": {"w0": _sums(compute=1.0)}, "broker": _sums(handle=0.1)}
    w0 = _sums(compute=3.0, queue=0.5, serialise=0.1)
    after = {"workers": {"w0": {**w0, "steps": 4}}, "broker": _sums(handle=0.3)}
    before["workers"]["w0"]["steps"] = 2
    b = per_token(before, after, tokens=10, measured_s=0.5)
    assert difference(after["broker"], before["broker"])["handle_s"] == 0.3 - 0.1
    assert b["workers"]["w0"]["compute"] == 200.0  # (3.0 - 1.0) s / 10 tokens
    assert b["workers"]["w0"]["queue"] == 50.0
    assert b["broker"]["handle"] == 20.0
    assert b["timed"] == 200.0 + 50.0 + 10.0 + 20.0
    assert b["measured"] == 500.0 and b["untimed"] == 500.0 - b["timed"]
    assert b["mean_batch"]["w0"] == 0.0  # compute_n did not change: (10 - 10) / 2 steps
    text = table(16, b)
    for phase, _ in WORKER_PHASES:
        assert phase in text
    assert all(what[:40] in text for _, what in BROKER_PHASES)


def test_groups_split_the_running_requests_by_the_routes_hops() -> None:
    from blockllm.worker.groups import Groups

    g = Groups(fallback_fraction=0.5)
    assert g.size(16) is None  # no FORWARD yet: no route known
    for i in range(16):
        g.on_forward(f"r{i}", 2)
    assert g.size(16) == 8 and g.size(15) == 8 and g.size(1) is None
    g.on_forward("r0", 3)  # one request on a 3-hop route: the longest route counts
    assert g.size(16) == 6
    g.clear()
    g.on_forward("r1", 1)  # everything on one worker: one group
    assert g.size(16) is None
    g.on_forward("r2", 0)  # a broker that does not say: no groups
    assert g.size(16) is None


def test_groups_wait_for_a_step_fixed_cost_fitted_from_measured_steps() -> None:
    from blockllm.worker.groups import Groups

    g = Groups(fallback_fraction=0.5)
    assert g.fixed_cost_s() is None and g.wait_s(0.2) == 0.1  # nothing measured: the fraction
    for items in (1, 4, 8, 8, 4, 1):
        g.on_step(items, 0.010 + 0.002 * items)  # a = 10 ms fixed, 2 ms per item
    assert abs(g.fixed_cost_s() - 0.010) < 1e-9
    assert abs(g.wait_s(0.5) - 0.010) < 1e-9
    g2 = Groups(0.5)
    for items in (1, 8):
        g2.on_step(items, 0.001 * items)  # no fixed cost at all: never wait
    assert g2.wait_s(0.5) == 0.0


def test_batch_queue_takes_at_most_the_group_limit() -> None:
    from blockllm.worker.batch_queue import BatchQueue

    q: BatchQueue[int] = BatchQueue(capacity=32, max_batch_size=16, max_batch_tokens=1024)
    for i in range(12):
        q.push(i, 1)
    assert q.take(limit=5) == [0, 1, 2, 3, 4]
    assert q.take(busy_size=2, limit=5) == [5, 6, 7]  # what already runs counts too
    assert q.take(limit=100) == [8, 9, 10, 11]  # never above max_batch_size; the rest
