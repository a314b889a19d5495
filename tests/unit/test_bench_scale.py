"""`blockllm bench scale` on its smallest size: the simulation drives the real broker and
planner to served tokens, and the report has every figure of the table (short: seconds)."""

from __future__ import annotations

import gc

import pytest

from blockllm.client.bench.scale import run_size, table
from blockllm.client.bench.scale_sim import StepCost


def test_step_cost_follows_the_measured_curve() -> None:
    cost = StepCost()
    assert cost.seconds(1, 30) == pytest.approx(0.056)
    assert cost.seconds(8, 30) == pytest.approx(0.097)
    assert cost.seconds(32, 15) == pytest.approx(0.171 / 2)
    assert cost.seconds(4, 30) < cost.seconds(8, 30) < 8 * cost.seconds(1, 30)


@pytest.mark.timeout(240)
def test_a_small_day_in_the_life() -> None:
    row = run_size(18, 4, duration=8.0, rate=6.0, tokens=4)
    assert row["uncovered"] == 0 and row["replicas"] >= 18
    assert row["tokens"] > 100 and row["requests_finished"] > 20
    # the planner placed by demand and the workers loaded what it asked for
    assert row["planner_replans"] >= 1 and row["burst_commands_max"] > 0
    assert row["planner_incremental"] >= 1  # a worker of the trace died: only its replicas moved
    assert 0 < row["hops_per_token_hot"] <= 2
    assert 0 < row["memory_used_max"] <= 1.0
    assert row["broker_us_per_message"] > 0 and row["stats_kb_max"] > 0
    assert row["broker_us_per_result"] > 0 and row["broker_messages"]["Result"] > 0
    assert row["broker_bad_messages"] == 0  # the simulated workers answer as real ones do
    assert row["status_kb_max"] > 0
    # the collector's part of each kind is reported beside it (and the process left unfrozen)
    gc_part = row["broker_gc_us_by_kind"]
    assert gc_part.keys() == row["broker_us_by_kind"].keys()
    assert all(0 <= gc_part[k] <= row["broker_us_by_kind"][k] for k in gc_part)
    assert row["gc_full_ms"] > 0 and gc.get_freeze_count() == 0
    assert set(row["errors"]) <= {"WORKER_LOST", "NO_ROUTE"}, row["errors"]
    text = table([row])
    assert text.splitlines()[2].startswith("| 18 | 4 |")
