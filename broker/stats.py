"""What the broker publishes to the planner: per-model demand and latency, per-worker load.

`Metrics` (pure, fed by the Broker's request flow) keeps bounded, time-windowed samples per
model: request arrivals and tokens (rates), time to first token and time per output token
(percentiles over the last `window_s`, so a recovery shows within that window). `stats_body`
is the STATS message body (protocol StatsBody): the STATUS body (workers with their stages,
queues, batching, KV, RSS; models with coverage and routes) plus, per model (ModelStats),
`rate_rps`, `token_rate`, `ttft_ms_p50/p95`, `tpot_ms_p50/p95`, `completed`, and the broker's
`time` (monotonic s), `interval_s` and `catalog_gen`. The broker process publishes it on its
PUB socket every `stats_interval_s`.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockllm.broker.protocol import ModelStats, ModelStatus, StatsBody

if TYPE_CHECKING:
    from blockllm.broker.shown import RouteFn, ShownRoutes
    from blockllm.broker.state import BrokerState

MAX_SAMPLES = 4096  # per model and kind: memory stays bounded whatever the load


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values` by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(slots=True)
class ModelMetrics:
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    tokens: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    ttft_ms: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    tpot_ms: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    completed: int = 0


class Metrics:
    """Per-model samples over a sliding window. Broker loop thread only."""

    def __init__(self, window_s: float = 20.0, rate_window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.rate_window_s = rate_window_s
        self.models: dict[str, ModelMetrics] = {}
        self.observer: Any = None  # also told of every token (broker/prom.py BrokerMetrics)

    def _of(self, model: str) -> ModelMetrics:
        m = self.models.get(model)
        if m is None:
            m = self.models[model] = ModelMetrics()
        return m

    def on_request(self, model: str, now: float) -> None:
        self._of(model).arrivals.append(now)

    def on_token(self, model: str, now: float, created: float, last_token_at: float) -> None:
        """A token was emitted; the first of a request gives a TTFT, the others a TPOT."""
        if self.observer is not None:
            self.observer.on_token(model, now, created, last_token_at)
        m = self._of(model)
        m.tokens.append(now)
        if last_token_at <= 0:
            m.ttft_ms.append((now, (now - created) * 1000))
        else:
            m.tpot_ms.append((now, (now - last_token_at) * 1000))

    def on_complete(self, model: str) -> None:
        self._of(model).completed += 1

    def model_stats(self, model: str, now: float) -> dict[str, Any]:
        m = self.models.get(model) or ModelMetrics()
        since = now - self.window_s
        rate_since = now - self.rate_window_s
        ttft = [v for t, v in m.ttft_ms if t >= since]
        tpot = [v for t, v in m.tpot_ms if t >= since]
        return {
            "rate_rps": sum(1 for t in m.arrivals if t >= rate_since) / self.rate_window_s,
            "token_rate": sum(1 for t in m.tokens if t >= rate_since) / self.rate_window_s,
            "ttft_ms_p50": round(percentile(ttft, 0.5), 3),
            "ttft_ms_p95": round(percentile(ttft, 0.95), 3),
            "tpot_ms_p50": round(percentile(tpot, 0.5), 3),
            "tpot_ms_p95": round(percentile(tpot, 0.95), 3),
            "completed": m.completed,
        }


def stats_body(
    b: BrokerState, route_of: RouteFn, now: float, shown: ShownRoutes | None = None
) -> StatsBody:
    """The STATS body: the STATUS body plus demand and latency per model (module docstring);
    `shown` as status_body's."""
    from blockllm.broker.status import status_body

    status = status_body(b, route_of, now, shown=shown)
    return StatsBody(
        workers=status.workers,
        models={n: model_stats(m, b.metrics.model_stats(n, now)) for n, m in status.models.items()},
        requests=status.requests,
        counters=status.counters,
        timings=status.timings,
        stats_endpoint=status.stats_endpoint,
        totals=status.totals,
        time=now,
        interval_s=b.cfg.stats_interval_s,
        catalog_gen=b.catalog_gen,  # changes on reload: the planner re-reads its catalog
    )


_STATUS_FIELDS = tuple(f.name for f in dataclasses.fields(ModelStatus))


def model_stats(status: ModelStatus, metrics: dict[str, Any]) -> ModelStats:
    """A model's STATS entry: its STATUS entry's fields, then `metrics` (Metrics.model_stats)."""
    return ModelStats(**{f: getattr(status, f) for f in _STATUS_FIELDS}, **metrics)
