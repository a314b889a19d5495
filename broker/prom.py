"""Prometheus metrics of the broker and worker processes (`--metrics-port`; optional extra).

`prometheus_client` is imported only when a port is given (`pip install 'blockllm[metrics]'`);
without it `require()` raises MetricsUnavailable with that advice. Each process owns its own
`CollectorRegistry` and serves it with prometheus_client's HTTP server thread on
`host:port` (port 0: the OS picks; the bound port is logged and returned).

Thread rules: histograms are observed and gauges set from the process's own loop thread
(prometheus_client's metric objects are thread-safe); the HTTP thread only reads them.

Series (all prefixed `blockllm_`):
  broker: requests_running{model}, requests_waiting{model},
          time_to_first_token_seconds{model}, time_per_output_token_seconds{model} (histograms)
  worker: stage_queue_depth{worker,stage,model}, batch_size{worker} and
          step_latency_seconds{worker} (histograms), kv_used_bytes{worker},
          kv_total_bytes{worker}, kv_geometry_used_bytes{worker,geometry},
          kv_geometry_sequences{worker,geometry}
  planner: planner_snapshots_total, planner_commands_total{kind},
           planner_commands_refused_total, planner_workers
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class MetricsUnavailable(RuntimeError):
    """--metrics-port was given but prometheus_client is not installed."""


def require() -> Any:
    """The prometheus_client module; MetricsUnavailable (with the install advice) if absent."""
    try:
        import prometheus_client
    except ImportError:
        raise MetricsUnavailable(
            "--metrics-port needs the prometheus_client package: "
            "pip install 'blockllm[metrics]' (or pip install prometheus_client)"
        ) from None
    return prometheus_client


def serve(registry: Any, host: str, port: int) -> tuple[Any, int]:
    """Start the HTTP exposition thread; returns (server, bound port). Raises OSError."""
    prom = require()
    server, _thread = prom.start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_port)
    logger.info("[ready] metrics on http://%s:%d/metrics", host, bound)
    return server, bound


class BrokerMetrics:
    """The broker's series; `update()` and `on_token()` from the broker loop thread."""

    def __init__(self) -> None:
        prom = require()
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.running = prom.Gauge(
            "blockllm_requests_running", "Requests routed to workers", ["model"], registry=r
        )
        self.waiting = prom.Gauge(
            "blockllm_requests_waiting", "Requests waiting for a route", ["model"], registry=r
        )
        self.ttft = prom.Histogram(
            "blockllm_time_to_first_token_seconds",
            "Time from request arrival to its first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = prom.Histogram(
            "blockllm_time_per_output_token_seconds",
            "Time between consecutive tokens of a request",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._models: set[str] = set()

    def on_token(self, model: str, now: float, created: float, last_token_at: float) -> None:
        if model not in self._models:  # the series exist even if no tick saw it running
            self._models.add(model)
            self.running.labels(model)
            self.waiting.labels(model)
        if last_token_at <= 0:
            self.ttft.labels(model).observe(max(0.0, now - created))
        else:
            self.tpot.labels(model).observe(max(0.0, now - last_token_at))

    def update(self, broker: Any) -> None:
        """Running/waiting per model from the Broker's state (its loop thread only)."""
        waiting_ids = set(broker.waiting)
        running: Counter[str] = Counter()
        waiting: Counter[str] = Counter()
        for rid, req in broker.requests.items():
            (waiting if rid in waiting_ids else running)[req.spec.name] += 1
        self._models |= set(running) | set(waiting)
        for model in self._models:
            self.running.labels(model).set(running[model])
            self.waiting.labels(model).set(waiting[model])


class PlannerMetrics:
    """The planner's series; updated from its loop thread."""

    def __init__(self) -> None:
        prom = require()
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.snapshots = prom.Counter(
            "blockllm_planner_snapshots", "STATS snapshots the planner acted on", registry=r
        )
        self.commands = prom.Counter(
            "blockllm_planner_commands", "Commands sent to the broker", ["kind"], registry=r
        )
        self.refused = prom.Counter(
            "blockllm_planner_commands_refused", "Commands the broker refused", registry=r
        )
        self.workers = prom.Gauge(
            "blockllm_planner_workers", "Live workers in the last snapshot", registry=r
        )

    def on_stats(self, body: Any, commands: list[Any]) -> None:
        self.snapshots.inc()
        self.workers.set(len(body.workers))
        for cmd in commands:
            self.commands.labels(cmd.KIND.name).inc()


class WorkerMetrics:
    """A worker's series; `on_step()` / `update()` from the worker's compute loop."""

    def __init__(self, worker: str) -> None:
        prom = require()
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.worker = worker
        self.queue_depth = prom.Gauge(
            "blockllm_stage_queue_depth",
            "Items queued at a stage",
            ["worker", "stage", "model"],
            registry=r,
        )
        self.batch = prom.Histogram(
            "blockllm_batch_size",
            "Items per engine step",
            ["worker"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.step = prom.Histogram(
            "blockllm_step_latency_seconds",
            "Engine step latency",
            ["worker"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_used = prom.Gauge(
            "blockllm_kv_used_bytes", "KV cache bytes in use", ["worker"], registry=r
        )
        self.kv_total = prom.Gauge(
            "blockllm_kv_total_bytes", "KV cache bytes allocated", ["worker"], registry=r
        )
        self.kv_total.labels(worker)
        self.kv_used.labels(worker)
        self.geo_used = prom.Gauge(
            "blockllm_kv_geometry_used_bytes",
            "KV arena bytes in use per KV geometry (kv heads x head dim / dtype)",
            ["worker", "geometry"],
            registry=r,
        )
        self.geo_seqs = prom.Gauge(
            "blockllm_kv_geometry_sequences",
            "Requests holding KV per KV geometry",
            ["worker", "geometry"],
            registry=r,
        )
        self._stages: set[tuple[str, str]] = set()

    def on_step(self, seconds: float, batch: int) -> None:
        self.step.labels(self.worker).observe(seconds)
        self.batch.labels(self.worker).observe(batch)

    def update(self, stats: Any, stage_models: dict[str, str]) -> None:
        """Queue depth per stage and KV use from the engine's `WorkerStatus`."""
        self.kv_total.labels(self.worker).set(stats.kv_total_bytes)
        self.kv_used.labels(self.worker).set(stats.kv_used_bytes)
        seen = set()
        for key, depth in stats.queue_depths.items():
            labels = (key[:12], stage_models.get(key, ""))
            seen.add(labels)
            self.queue_depth.labels(self.worker, *labels).set(depth)
        for gone in self._stages - seen:  # an unloaded stage's series goes away
            self.queue_depth.remove(self.worker, *gone)
        self._stages = seen

    def update_geometries(self, geometries: Any) -> None:
        """Per KV geometry (worker/kv_cache.py `GeometryStats`): bytes and sequences."""
        for g in geometries:
            self.geo_used.labels(self.worker, g.label).set(g.used_bytes)
            self.geo_seqs.labels(self.worker, g.label).set(g.n_sequences)
