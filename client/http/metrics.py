"""Prometheus metrics of the HTTP layer, served by the app itself at `/metrics`.

Series (prefix `blockllm_http_`): requests_total{endpoint,model,status},
request_duration_seconds{endpoint} and time_to_first_token_seconds{endpoint} (histograms),
prompt_tokens_total{model}, completion_tokens_total{model}, streams_active. `model` is only ever
a served model's name ("-" for a request refused before its model was known), so the label set
stays bounded. One registry per app (tests run several in one process).
"""

from __future__ import annotations

from typing import Any

from blockllm.broker.prom import LATENCY_BUCKETS, require


class HttpMetrics:
    """The series of one app; observed from its event loop only."""

    def __init__(self) -> None:
        prom = require()
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter(
            "blockllm_http_requests",
            "HTTP API requests answered",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.duration = prom.Histogram(
            "blockllm_http_request_duration_seconds",
            "Time from request to the last byte",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = prom.Histogram(
            "blockllm_http_time_to_first_token_seconds",
            "Time from request to the first token",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = prom.Counter(
            "blockllm_http_prompt_tokens", "Prompt tokens", ["model"], registry=r
        )
        self.completion_tokens = prom.Counter(
            "blockllm_http_completion_tokens", "Generated tokens", ["model"], registry=r
        )
        self.streams = prom.Gauge("blockllm_http_streams_active", "Open SSE streams", registry=r)

    def done(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()
        self.duration.labels(endpoint).observe(seconds)

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.completion_tokens.labels(model).inc(completion)

    def exposition(self) -> tuple[bytes, str]:
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST


def maybe_metrics() -> Any:
    """HttpMetrics, or None when prometheus_client is not installed (then /metrics is 404)."""
    try:
        return HttpMetrics()
    except Exception:
        return None
