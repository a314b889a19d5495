"""What the broker publishes to the planner: per-model demand and latency, per-worker load.

`Metrics` (pure, fed by the Broker's request flow) keeps bounded, time-windowed samples per
model: request arrivals and tokens (rates), time to first token and time per output token
(percentiles over the last `window_s`, so a recovery shows within that window). `stats_body`
is the STATS message body (protocol StatsBody): the STATUS body (workers with their stages,
queues, batching, KV, RSS; models with coverage and routes) plus, per model (ModelStats),
`rate_rps`, `token_rate`, `ttft_ms_p50/p95`, `tpot_ms_p50/p95`, `completed`, and the broker's
`time` (monotonic s), `interval_s` and `catalog_gen`. The broker process publishes it on its
PUB socket every `stats_interval_s`. The broker's builds keep each model's entry while it does
not change (`StatsEntries`; its metrics: `Metrics.cached_stats`), so that publishing
(broker/stats_delta.py) costs what changed; a build from scratch is the reference
(tests/unit/test_stats_exact.py).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import operator
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockllm.broker.protocol import ModelStats, ModelStatus, RequestCounts, StatsBody, Totals

if TYPE_CHECKING:
    from blockllm.broker.shown import RouteFn, ShownRoutes
    from blockllm.broker.state import BrokerState

_IDLE: dict[str, Any] = {}  # filled below: a model with no samples (never mutated)
MAX_SAMPLES = 4096  # per model and kind: memory stays bounded whatever the load


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values` by nearest rank; 0.0 for no values."""
    return _rank(sorted(values), q)


def _rank(ordered: list[float], q: float) -> float:
    """`percentile` of values already sorted."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(slots=True)
class ModelMetrics:
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    tokens: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    ttft_ms: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    tpot_ms: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    completed: int = 0
    version: int = 0  # bumped by every sample (and completion): what `cached_stats` keys on
    ordered: bool = True  # every deque's samples in time order (then `_stats` bisects)
    # (version, now, oldest sample counted in the rate window, in the latency window, stats)
    cached: tuple[int, float, float, float, dict[str, Any]] | None = None


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
        m = self._of(model)
        if m.arrivals and now < m.arrivals[-1]:
            m.ordered = False
        m.arrivals.append(now)
        m.version += 1

    def on_token(self, model: str, now: float, created: float, last_token_at: float) -> None:
        """A token was emitted; the first of a request gives a TTFT, the others a TPOT."""
        if self.observer is not None:
            self.observer.on_token(model, now, created, last_token_at)
        m = self._of(model)
        m.version += 1
        if m.tokens and now < m.tokens[-1]:  # (ttft and tpot samples are a share of these)
            m.ordered = False
        m.tokens.append(now)
        if last_token_at <= 0:
            m.ttft_ms.append((now, (now - created) * 1000))
        else:
            m.tpot_ms.append((now, (now - last_token_at) * 1000))

    def on_complete(self, model: str) -> None:
        m = self._of(model)
        m.completed += 1
        m.version += 1

    def model_stats(self, model: str, now: float) -> dict[str, Any]:
        """The model's demand and latency at `now` (ModelStats' metric fields)."""
        return self._stats(self.models.get(model) or ModelMetrics(), now)[0]

    def cached_stats(self, model: str, now: float) -> dict[str, Any]:
        """`model_stats`, the same dict object while it would not change: no sample came
        since and every sample it counted is still in its window (the samples it did not
        count are older, and `now` only grows). A model with no samples: one shared dict."""
        m = self.models.get(model)
        if m is None:
            return _IDLE
        c = m.cached
        if (
            c is not None
            and c[0] == m.version
            and c[1] <= now
            and c[2] >= now - self.rate_window_s
            and c[3] >= now - self.window_s
        ):
            return c[4]
        out, oldest_rate, oldest = self._stats(m, now)
        m.cached = (m.version, now, oldest_rate, oldest, out)
        return out

    def _stats(self, m: ModelMetrics, now: float) -> tuple[dict[str, Any], float, float]:
        """(model_stats, the oldest sample time counted in the rate window, in the latency
        window; math.inf for none)."""
        if m.ordered:
            return self._stats_ordered(m, now)
        since = now - self.window_s
        rate_since = now - self.rate_window_s
        ttft = [(t, v) for t, v in m.ttft_ms if t >= since]
        tpot = [(t, v) for t, v in m.tpot_ms if t >= since]
        arrivals = [t for t in m.arrivals if t >= rate_since]
        tokens = [t for t in m.tokens if t >= rate_since]
        oldest_rate = min(min(arrivals, default=math.inf), min(tokens, default=math.inf))
        oldest = min(
            min((t for t, _ in ttft), default=math.inf), min((t for t, _ in tpot), default=math.inf)
        )
        return self._summary(m, ttft, tpot, len(arrivals), len(tokens)), oldest_rate, oldest

    def _summary(
        self,
        m: ModelMetrics,
        ttft: Iterable[tuple[float, float]],
        tpot: Iterable[tuple[float, float]],
        arrivals: int,
        tokens: int,
    ) -> dict[str, Any]:
        """model_stats from the samples in the windows (`_stats` and `_stats_ordered`)."""
        ttft_ms = sorted([v for _, v in ttft])
        tpot_ms = sorted([v for _, v in tpot])
        return {
            "rate_rps": arrivals / self.rate_window_s,
            "token_rate": tokens / self.rate_window_s,
            "ttft_ms_p50": round(_rank(ttft_ms, 0.5), 3),
            "ttft_ms_p95": round(_rank(ttft_ms, 0.95), 3),
            "tpot_ms_p50": round(_rank(tpot_ms, 0.5), 3),
            "tpot_ms_p95": round(_rank(tpot_ms, 0.95), 3),
            "completed": m.completed,
        }

    def _stats_ordered(self, m: ModelMetrics, now: float) -> tuple[dict[str, Any], float, float]:
        """`_stats` when every deque is in time order: a window's samples are a suffix, found
        by bisection (tests/unit/test_stats_exact.py compares it with the plain scan)."""
        since = now - self.window_s
        rate_since = now - self.rate_window_s
        ttft = _suffix(m.ttft_ms, since, _time)
        tpot = _suffix(m.tpot_ms, since, _time)
        arrivals = _suffix(m.arrivals, rate_since, None)
        tokens = _suffix(m.tokens, rate_since, None)
        oldest_rate = min(arrivals[0] if arrivals else math.inf, tokens[0] if tokens else math.inf)
        oldest = min(ttft[0][0] if ttft else math.inf, tpot[0][0] if tpot else math.inf)
        return self._summary(m, ttft, tpot, len(arrivals), len(tokens)), oldest_rate, oldest


_time = operator.itemgetter(0)


def _suffix(samples: deque[Any], since: float, key: Any) -> list[Any]:
    """The samples at `since` or later of a deque in time order."""
    if not samples or (samples[0] if key is None else key(samples[0])) >= since:
        return list(samples)
    i = bisect.bisect_left(samples, since, key=key)
    return list(itertools.islice(samples, i, None))


def stats_body(
    b: BrokerState,
    route_of: RouteFn,
    now: float,
    shown: ShownRoutes | None = None,
    entries: StatsEntries | None = None,
) -> StatsBody:
    """The STATS body: the STATUS body plus demand and latency per model (module docstring);
    `shown` as status_body's. `entries`: the models' entries kept between builds (the
    broker's; None: every entry built afresh, the reference the kept ones are tested
    against)."""
    from blockllm.broker.status import status_body

    if entries is not None:
        return entries.body(b, route_of, now, b.shown if shown is None else shown)
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


class StatsEntries:
    """The models' STATS entries kept between builds: a model's entry is the same object as
    long as what it is made of is equal (its spec, route shown and substitutions, requests
    running and waiting, why uncovered, planned routes, and its metrics: Metrics.cached_stats
    keeps them while no sample came or left its window). What publishes the body
    (stats_delta.DeltaPublisher) skips an entry that is the same object as before, so a
    snapshot costs what changed. Broker loop thread only; one per BrokerState."""

    def __init__(self) -> None:
        self._models: dict[str, tuple[tuple[Any, ...], ModelStats]] = {}
        self.built = 0  # entries made (tests, benches)

    def body(self, b: BrokerState, route_of: RouteFn, now: float, shown: ShownRoutes) -> StatsBody:
        from blockllm.broker.status import worker_entry

        shown.refresh(b, now, b.cfg.stats_routes_per_build)
        running = sum(1 for r in b.requests.values() if r.route is not None)
        workers = sorted(b.workers.values(), key=lambda w: w.registered_at)
        models = {n: self._model(b, route_of, n, now, shown) for n in sorted(b.models)}
        if len(self._models) > len(models):
            self._models = {n: v for n, v in self._models.items() if n in models}
        return StatsBody(
            workers=tuple(worker_entry(w, now) for w in workers),
            models=models,
            requests=RequestCounts(running, len(b.requests) - running),
            counters=dict(b.counters),
            timings=b.timings.snapshot(),
            stats_endpoint=b.stats_endpoint,
            totals=Totals(len(b.workers), len(b.models)),
            time=now,
            interval_s=b.cfg.stats_interval_s,
            catalog_gen=b.catalog_gen,
        )

    def _model(
        self, b: BrokerState, route_of: RouteFn, name: str, now: float, shown: ShownRoutes
    ) -> ModelStats:
        """`name`'s entry (status.model_entry's fields, then its metrics)."""
        from blockllm.broker.status import uncovered_reason

        spec = b.models[name]
        (route, substitutions), stale = shown.get(b, route_of, name)
        running = waiting = 0
        requests = b.requests
        for rid in b.by_model.get(name, ()):
            r = requests.get(rid)
            if r is not None:
                if r.route is not None:
                    running += 1
                else:
                    waiting += 1
        uncovered = "" if route is not None else uncovered_reason(b, name, now)
        planned = b.preferred.get(name, ())
        metrics = b.metrics.cached_stats(name, now)
        key = (spec, route, stale, substitutions, running, waiting, uncovered, planned, metrics)
        kept = self._models.get(name)
        if kept is not None and kept[0] == key:
            return kept[1]
        entry = ModelStats(
            layers=spec.num_layers,
            chain_len=spec.chain_len,
            covered=route is not None,
            uncovered=uncovered,
            route=route,
            running=running,
            waiting=waiting,
            planned_routes=planned,
            substitutions=substitutions,
            **metrics,
            route_stale=stale,
        )
        self._models[name] = (key, entry)
        self.built += 1
        return entry


_STATUS_FIELDS = tuple(f.name for f in dataclasses.fields(ModelStatus))


def model_stats(status: ModelStatus, metrics: dict[str, Any]) -> ModelStats:
    """A model's STATS entry: its STATUS entry's fields, then `metrics` (Metrics.model_stats)."""
    return ModelStats(**{f: getattr(status, f) for f in _STATUS_FIELDS}, **metrics)


_IDLE.update(Metrics().model_stats("", 0.0))
