"""A planner pointed where no broker answers exits 1 within its ready timeout, with one line
that says what to check, not a traceback."""

from __future__ import annotations

import logging
import socket

import pytest

from blockllm.broker.planner.config import PlannerConfig
from blockllm.broker.planner.proc import run_planner_process


@pytest.mark.timeout(60)
def test_a_planner_with_no_broker_there_exits_1_with_one_line(tmp_path, caplog) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = PlannerConfig(
        broker=f"tcp://127.0.0.1:{port}", ready_timeout_s=1.0, zoo_dir=str(tmp_path)
    )
    with caplog.at_level(logging.ERROR, logger="blockllm.broker.planner.proc"):
        assert run_planner_process(cfg) == 1
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is None
    assert f"no STATUS from the broker at tcp://127.0.0.1:{port}" in record.getMessage()
    assert "is a broker running there?" in record.getMessage()
