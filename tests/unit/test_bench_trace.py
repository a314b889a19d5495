"""The multi-tenant benchmark's trace and statistics (pure)."""

from __future__ import annotations

import pytest

from blockllm.client.bench.trace import (
    Outcome,
    TraceSpec,
    make_trace,
    percentile,
    summarize,
    zipf_weights,
)

TENANTS = ["base", "a", "b", "c", "d"]
STREAM = list(range(1000))


def test_trace_is_fixed_by_its_seed_and_skewed() -> None:
    spec = TraceSpec(requests=400, rate=5.0, seed=3, prompt_tokens=(4, 9), new_tokens=(2, 5))
    one, two = make_trace(spec, TENANTS, STREAM), make_trace(spec, TENANTS, STREAM)
    assert one == two
    assert one != make_trace(TraceSpec(400, 5.0, seed=4), TENANTS, STREAM)
    arrivals = [r.arrival_s for r in one]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    assert 400 / 5.0 * 0.8 < arrivals[-1] < 400 / 5.0 * 1.2  # Poisson at 5/s
    assert all(4 <= len(r.prompt_ids) <= 9 and 2 <= r.max_new_tokens <= 5 for r in one)
    counts = sorted((sum(r.model == t for r in one) for t in TENANTS), reverse=True)
    assert counts[0] > 2 * counts[-1]  # Zipf: the top tenant far above the last
    assert zipf_weights(3, 0.0) == pytest.approx([1 / 3] * 3)


def test_summarize_contract() -> None:
    outs = [Outcome(i, "a", float(i), i + 0.1, i + 1.0 + i / 10, tokens=10) for i in range(10)]
    outs.append(Outcome(10, "b", 10.0, error="Timeout: late"))
    s = summarize(outs, resident_bytes=123)
    assert s["requests"] == 11 and s["errors"] == 1 and s["resident_bytes"] == 123
    assert s["p50_ms"] == pytest.approx(1450.0) and s["ttft_p95_ms"] == pytest.approx(100.0)
    assert s["tokens_per_s"] == pytest.approx(100 / 10.9, rel=1e-3)
    assert percentile([], 50) != percentile([], 50)  # nan when nothing completed


def test_variants_take_distinct_slices_of_the_upper_layers() -> None:
    from blockllm.client.bench.family import variant_plans

    plans = variant_plans("smollm2", 30, 6, "partial")
    assert [p.layers for p in plans] == [(28, 29), (26, 27), (24, 25), (22, 23), (20, 21), (18, 19)]
    assert len({p.seed for p in plans}) == 6
    wrapped = variant_plans("tiny", 8, 6, "partial")  # 4 upper layers, 6 variants: wrap around
    assert [p.layers for p in wrapped] == [(7, 7), (6, 6), (5, 5), (4, 4), (7, 7), (6, 6)]
    assert all(p.layers is None for p in variant_plans("b", 30, 3, "full"))
