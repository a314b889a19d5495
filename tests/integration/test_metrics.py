"""Prometheus endpoints (`--metrics-port`) of a real broker and worker answer with the series.

Ports come from the OS: a socket bound to 127.0.0.1:0 names a free one, which the processes
then bind (the endpoints cannot report a port back through the launcher).
"""

from __future__ import annotations

import socket
import sys
import urllib.request
from pathlib import Path

import pytest

from blockllm.broker import prom
from blockllm.broker.protocol import StatsBody, WorkerStatus
from blockllm.zoo import Zoo
from tests.integration.cluster import cluster, make_zoo

pytest.importorskip("prometheus_client")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def test_require_without_the_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    with pytest.raises(prom.MetricsUnavailable, match=r"blockllm\[metrics\]"):
        prom.require()


def test_broker_and_worker_metrics_endpoints(tiny_checkpoint, tmp_path: Path):
    zoo_dir = make_zoo(tmp_path / "zoo", {"llama": tiny_checkpoint("llama")})
    n = len(Zoo(zoo_dir).manifest("llama").chain)
    bport, wport = _free_port(), _free_port()
    with cluster(
        zoo_dir,
        {"w0": [f"llama:0-{n}"]},
        ["llama"],
        broker={"metrics_port": bport},
        worker_kw={"w0": {"metrics_port": wport}},
    ) as c:
        with c.client(timeout=60) as client:
            client.generate("llama", input_ids=[3, 4, 5], max_new_tokens=4)
        broker_text = _scrape(bport)
        worker_text = _scrape(wport)
    for series in (
        'blockllm_requests_running{model="llama"}',
        'blockllm_requests_waiting{model="llama"}',
        'blockllm_time_to_first_token_seconds_count{model="llama"} 1.0',
        'blockllm_time_per_output_token_seconds_count{model="llama"} 3.0',
    ):
        assert series in broker_text, series
    for series in (
        'blockllm_stage_queue_depth{model="llama",stage=',
        'blockllm_batch_size_count{worker="w0"}',
        'blockllm_step_latency_seconds_bucket{le="0.005",worker="w0"}',
        'blockllm_kv_used_bytes{worker="w0"}',
        'blockllm_kv_total_bytes{worker="w0"}',
    ):
        assert series in worker_text, series


def test_planner_metrics_endpoint_reports_its_bound_port():
    from blockllm.broker.planner.config import PlannerConfig
    from blockllm.broker.planner.proc import PlannerProc

    # no broker needed: the endpoint is up before the planner subscribes to any stats
    proc = PlannerProc(PlannerConfig(broker="tcp://127.0.0.1:9", metrics_port=0))
    try:
        port = proc.start_metrics()
        assert port
        proc.prom.on_stats(StatsBody((WorkerStatus("a"), WorkerStatus("b"))), [])
        text = _scrape(port)
    finally:
        proc.close()
    for series in (
        "blockllm_planner_snapshots_total 1.0",
        "blockllm_planner_workers 2.0",
        "blockllm_planner_commands_refused_total 0.0",
        "# TYPE blockllm_planner_commands_total counter",
    ):
        assert series in text, series
