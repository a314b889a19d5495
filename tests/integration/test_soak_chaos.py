"""`bench soak --chaos` for one minute (issue 14): two tenants on three workers under four
closed-loop streams, with a worker SIGKILLed (and restarted), a worker SIGSTOPped, the planner
killed and restarted, and the broker killed and restarted on the same address. Nothing is
lost, nothing is wrong, every fault is recovered from."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockllm.client.bench.soak import SoakConfig, run_soak
from tests.integration.cluster import make_zoo, perturbed_copy


@pytest.mark.timeout(400)
def test_one_minute_of_chaos_loses_nothing_and_answers_nothing_wrong(llama: Path, tmp_path):
    ft = perturbed_copy(llama, tmp_path / "ft", layers=[1, 2])
    zoo = make_zoo(tmp_path / "zoo", {"base": llama, "ft": ft})
    doc = run_soak(SoakConfig(zoo=str(zoo), models=("base", "ft"), minutes=1.0, chaos=True))
    assert doc["lost"] == 0 and doc["wrong"] == 0, doc
    assert doc["completed"] > 0, doc
    assert sorted(f["kind"] for f in doc["faults"]) == sorted(
        ["kill_worker", "stop_worker", "restart_planner", "restart_broker"]
    ), doc
    assert doc["recovery_s"]["unrecovered"] == 0, doc
