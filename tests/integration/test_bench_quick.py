"""`blockllm bench multitenant --quick` and `blockllm demo --tiny` end to end, each as a real
subprocess on a tiny random family (bounded: a hung run fails the test instead of the suite).
The multitenant runs share one --cache-dir: the first builds the family (base, fine-tunes, zoo),
the others reuse it, as a user's second run does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONTRACT = (
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "ttft_p95_ms",
    "tokens_per_s",
    "resident_bytes",
    "requests",
    "errors",
    "pss_peak_bytes",
    "pss_mean_bytes",
)
SYSTEMS = ("blockllm", "per_model", "per_model_all", "hf_generate", "hf_batched")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The family cache the multitenant runs share (one module: one xdist worker)."""
    return tmp_path_factory.mktemp("bench-cache")


def _blockllm(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "blockllm.client.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_bench_multitenant_quick_json_contract(cache: Path) -> None:
    args = [
        "bench",
        "multitenant",
        "--quick",
        "--tenants",
        "2",
        "--requests",
        "8",
        "--rate",
        "20",
        "--baseline-threads",
        "1",
        "--json",
        "--cache-dir",
        str(cache),
    ]
    proc = _blockllm(args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert set(doc) == {*SYSTEMS, "meta"}
    for name in SYSTEMS:
        assert all(k in doc[name] for k in CONTRACT), (name, doc[name])
        assert doc[name]["requests"] == 8 and doc[name]["errors"] == 0, (name, doc[name])
        assert doc[name]["tokens_per_s"] > 0 and doc[name]["p50_ms"] <= doc[name]["p99_ms"]
        # measured: every system's processes hold at least an interpreter with torch
        assert doc[name]["pss_peak_bytes"] >= doc[name]["pss_mean_bytes"] > 50 << 20, name
    assert doc["per_model"]["resident_bytes_unshared"] > doc["blockllm"]["resident_bytes"]
    assert doc["meta"]["systems"]["per_model_all"]["loads"] == 0  # every tenant held whole
    assert doc["meta"]["tenants"] == ["tiny", "tiny-ft1", "tiny-ft2"]
    assert doc["meta"]["dtype"] == "float32"
    assert "measured_memory_vs_per_model_all" in doc["meta"]["goals"]
    assert "tokens_per_s_vs_hf_batched" in doc["meta"]["goals"]
    assert "[bench]" in proc.stderr  # progress goes to stderr, the JSON alone to stdout


QUICK = ["--quick", "--tenants", "1", "--requests", "4", "--baseline-threads", "1", "--json"]


def test_bench_multitenant_saturate_is_a_closed_loop(cache: Path) -> None:
    args = ["bench", "multitenant", "--saturate", "2", "--systems", "blockllm,per_model"]
    proc = _blockllm([*args, *QUICK, "--cache-dir", str(cache)], timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["meta"]["saturate_clients"] == 2
    assert "capacity_vs_per_model" in doc["meta"]["goals"]
    assert "p95_reduction_vs_per_model" not in doc["meta"]["goals"]  # open loop only
    for name in ("blockllm", "per_model"):
        assert doc[name]["errors"] == 0 and doc[name]["tokens_per_s"] > 0, doc[name]


@pytest.mark.timeout(600)  # peft, a full fine-tune, blockllm twice, per_model
def test_bench_multitenant_lora_family_json_contract(cache: Path) -> None:
    """LoRA tenants and a full fine-tune: blockllm serves the adapters on the base (and the
    same trace again with every request on the base), per_model each adapter merged into a
    whole copy at load."""
    args = ["bench", "multitenant", "--family", "lora", "--systems", "blockllm,per_model"]
    # more than the others: peft makes the adapter, a full fine-tune is trained first
    args += ["--full-tenants", "1"]
    proc = _blockllm([*args, *QUICK, "--cache-dir", str(cache)], timeout=560)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert set(doc) == {"blockllm", "blockllm_base_only", "per_model", "meta"}
    for name in ("blockllm", "blockllm_base_only", "per_model"):
        assert all(k in doc[name] for k in CONTRACT), (name, doc[name])
        assert doc[name]["requests"] == 4 and doc[name]["errors"] == 0, (name, doc[name])
    meta = doc["meta"]
    assert meta["tenants"] == ["tiny", "tiny-lora1", "tiny-full1"]
    assert meta["family_mode"] == "lora"
    assert set(meta["goals"]) >= {
        "p95_reduction_vs_per_model",
        "accounted_memory_vs_base_plus_adapters",
        "tokens_per_s_vs_base_only",
    }
    # per_model holds a merged adapter as a whole model; blockllm a few blocks on the base
    assert doc["per_model"]["resident_bytes_unshared"] > doc["blockllm"]["resident_bytes"]


def test_bench_multitenant_rate_sweep_is_one_table(cache: Path) -> None:
    args = ["bench", "multitenant", "--rate", "10,20", "--systems", "per_model"]
    proc = _blockllm([*args, *QUICK, "--cache-dir", str(cache)], timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert [r["rate_rps"] for r in doc["rates"]] == [10.0, 20.0]
    for r in doc["rates"]:
        assert r["per_model"]["requests"] == 4 and r["per_model"]["errors"] == 0, r
        assert r["per_model"]["pss_peak_bytes"] > 0


def test_demo_tiny_streams_every_tenant_and_stops_cleanly(tmp_path: Path) -> None:
    args = ["demo", "--tiny", "--max-tokens", "8", "--cache-dir", str(tmp_path)]
    proc = _blockllm(args, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for phase in range(1, 7):
        assert f"[{phase}/6]" in out
    for name in ("tiny", "tiny-ft1", "tiny-ft2", "tiny-ft3"):
        assert f"{name} |" in out or f"| {name}" in out  # streamed lines / the side-by-side view
    assert "4 concurrent streams: 32 tokens" in out
    assert "$ curl http://127.0.0.1:" in out and "/v1/completions" in out  # the HTTP API too
    assert "stopped cleanly" in out
