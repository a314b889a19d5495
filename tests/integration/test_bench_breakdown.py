"""`blockllm bench pipeline --quick --breakdown` end to end (real broker and two worker
processes, a tiny random Llama): the per-token breakdown's contract, read from the processes'
own timings through STATUS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockllm.client.bench.breakdown import BROKER_PHASES, WORKER_PHASES


@pytest.mark.timeout(400)
def test_bench_pipeline_breakdown_contract(tmp_path: Path) -> None:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    args = ["bench", "pipeline", "--quick", "--breakdown", "--streams", "2"]
    args += ["--new-tokens", "6", "--json", "--zoo", str(tmp_path / "zoo")]
    proc = subprocess.run(
        [sys.executable, "-m", "blockllm.client.cli", *args],
        capture_output=True,
        text=True,
        timeout=380,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads(proc.stdout)["results"]
    b = result["breakdown"]
    assert b["settled"], b  # every worker's heartbeat counted every decode item
    assert len(b["workers"]) == 2  # one column per worker process
    for name, phases in b["workers"].items():
        assert set(phases) == {p for p, _ in WORKER_PHASES}, name
        assert phases["compute"] > 0 and phases["deserialise"] > 0, (name, phases)
        assert phases["serialise"] > 0 and min(phases.values()) >= 0, (name, phases)
        assert 1.0 <= b["mean_batch"][name] <= 2.0, b["mean_batch"]  # 2 streams at most
    assert set(b["broker"]) == {p for p, _ in BROKER_PHASES}
    assert b["broker"]["handle"] > 0
    timed = sum(sum(p.values()) for p in b["workers"].values()) + sum(b["broker"].values())
    assert abs(b["timed"] - timed) < 0.01 and b["untimed"] == pytest.approx(
        b["measured"] - b["timed"], abs=0.01
    )
    # the phases are disjoint stretches of a token's path: they cannot add up to much more
    # than the time between two tokens (a phase counted twice would); the clients' clock
    # reads add some noise
    assert 0 < b["timed"] <= 1.5 * b["measured"], b
    assert "ms per decode token, 2 streams" in proc.stderr  # the table
