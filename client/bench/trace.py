"""The multi-tenant benchmark's workload and its statistics (pure: no models, no sockets).

A trace is a list of requests fixed by a seed: Poisson arrivals (exponential gaps at `rate`
requests/s), the tenant of each drawn from a Zipf popularity over the tenants (rank r has weight
1 / r**s; which tenant holds which rank is itself drawn from the seed), and prompt and output
lengths drawn uniformly from ranges. Prompts are windows of a token stream (real text run
through the family's tokenizer), so every system gets the very same input ids.

Each system replays the trace and reports one `Outcome` per request; `summarize` turns them
into the JSON contract of `blockllm bench multitenant`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class TraceSpec:
    """How to draw a trace; the same spec and tenants give the same trace."""

    requests: int = 48
    rate: float = 1.0  # mean arrivals per second (Poisson)
    seed: int = 0
    zipf_s: float = 1.1
    prompt_tokens: tuple[int, int] = (16, 48)  # inclusive range
    new_tokens: tuple[int, int] = (16, 48)  # inclusive range


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of the trace: who asks, when (seconds after the start), and for what."""

    index: int
    arrival_s: float
    model: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int


@dataclass(slots=True)
class Outcome:
    """What one system did with one request (times in seconds after the trace start)."""

    index: int
    model: str
    arrival_s: float
    first_token_s: float | None = None
    finish_s: float | None = None
    tokens: int = 0
    error: str | None = None

    @property
    def latency_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s


def zipf_weights(n: int, s: float) -> list[float]:
    """Normalised Zipf weights of ranks 1..n (s = 0 is uniform)."""
    raw = [1.0 / (r**s) for r in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def make_trace(
    spec: TraceSpec, tenants: Sequence[str], token_stream: Sequence[int]
) -> list[TraceRequest]:
    """The trace of `spec` over `tenants`; prompts are windows of `token_stream`.

    Raises ValueError for an empty tenant list, a bad range or a too-short stream."""
    if not tenants or spec.requests < 1 or not spec.rate > 0:
        raise ValueError("need at least one tenant, one request and a rate > 0")
    (p_lo, p_hi), (n_lo, n_hi) = spec.prompt_tokens, spec.new_tokens
    if not 1 <= p_lo <= p_hi or not 1 <= n_lo <= n_hi:
        raise ValueError(f"bad length ranges {spec.prompt_tokens} / {spec.new_tokens}")
    if len(token_stream) <= p_hi:
        raise ValueError(f"token stream too short ({len(token_stream)} tokens) for the prompts")
    rng = random.Random(spec.seed)
    ranked = list(tenants)
    rng.shuffle(ranked)  # which tenant is the most popular is part of the seeded draw
    weights = zipf_weights(len(ranked), spec.zipf_s)
    t = 0.0
    out: list[TraceRequest] = []
    for i in range(spec.requests):
        if i:  # the first request arrives at once
            t += rng.expovariate(spec.rate)
        model = rng.choices(ranked, weights)[0]
        length = rng.randint(p_lo, p_hi)
        start = rng.randrange(0, len(token_stream) - length)
        prompt = tuple(int(x) for x in token_stream[start : start + length])
        out.append(TraceRequest(i, round(t, 6), model, prompt, rng.randint(n_lo, n_hi)))
    return out


def ensure_tenants(trace: list[TraceRequest], names: Sequence[str]) -> list[TraceRequest]:
    """`trace` with each of `names` that drew no request given one: the requests at evenly
    spaced places of the trace (never one already given) change tenant, times and lengths
    kept."""
    missing = [n for n in names if all(r.model != n for r in trace)]
    out = list(trace)
    for k, name in enumerate(missing):
        i = (k + 1) * len(out) // (len(missing) + 1)
        out[i] = replace(out[i], model=name)
    return out


def trace_facts(trace: Sequence[TraceRequest]) -> dict[str, Any]:
    """What the trace holds: per-tenant request counts, lengths, duration (for the report)."""
    per_model: dict[str, int] = {}
    for r in trace:
        per_model[r.model] = per_model.get(r.model, 0) + 1
    return {
        "requests": len(trace),
        "duration_s": round(trace[-1].arrival_s, 3) if trace else 0.0,
        "per_model": dict(sorted(per_model.items(), key=lambda kv: -kv[1])),
        "prompt_tokens_mean": round(sum(len(r.prompt_ids) for r in trace) / len(trace), 2),
        "max_new_tokens_sum": sum(r.max_new_tokens for r in trace),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks (numpy's)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(x: float) -> float | None:
    return None if math.isnan(x) else round(x * 1000.0, 1)


def summarize(outcomes: Sequence[Outcome], resident_bytes: int) -> dict[str, Any]:
    """The contract's numbers: latency percentiles (completed requests), ttft p95, tokens/s
    over the whole run (first arrival to last finish), resident bytes, requests, errors."""
    done = [o for o in outcomes if o.error is None and o.finish_s is not None]
    lat = [o.latency_s for o in done if o.latency_s is not None]
    ttft = [o.ttft_s for o in done if o.ttft_s is not None]
    tokens = sum(o.tokens for o in outcomes)
    start = min((o.arrival_s for o in outcomes), default=0.0)
    end = max((o.finish_s for o in done if o.finish_s is not None), default=start)
    span = end - start
    return {
        "p50_ms": _ms(percentile(lat, 50)),
        "p95_ms": _ms(percentile(lat, 95)),
        "p99_ms": _ms(percentile(lat, 99)),
        "ttft_p95_ms": _ms(percentile(ttft, 95)),
        "tokens_per_s": round(tokens / span, 2) if span > 0 else 0.0,
        "resident_bytes": int(resident_bytes),
        "requests": len(outcomes),
        "errors": sum(1 for o in outcomes if o.error is not None),
        "tokens": tokens,
        "makespan_s": round(span, 3),
    }


def latencies_ms(outcomes: Sequence[Outcome]) -> list[float]:
    """Completed requests' latencies in ms, sorted (for the CDF plot)."""
    return sorted(
        o.latency_s * 1000.0 for o in outcomes if o.error is None and o.latency_s is not None
    )
