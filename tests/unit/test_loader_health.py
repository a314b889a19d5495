"""The worker's loader thread reports how long a job has gone without progress (issue 14,
item 1): the compute loop stops feeding systemd's watchdog when that exceeds its bound."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from blockllm.worker.loader import LoadJob, StageLoader


@pytest.mark.timeout(30)
def test_a_hung_load_counts_as_stalled_and_a_finished_one_does_not() -> None:
    release, entered = threading.Event(), threading.Event()

    def fetch(model: str) -> int:  # a fetch that hangs until the test lets it go
        entered.set()
        release.wait(20)
        return 0

    inbox: queue.SimpleQueue = queue.SimpleQueue()
    loader = StageLoader(lambda m, s, e: {}, fetch, inbox)
    loader.start()
    try:
        assert loader.stalled_for() == 0.0  # idle
        loader.submit(LoadJob("m", 0, 2))
        assert entered.wait(10)
        later = time.monotonic() + 100
        assert loader.stalled_for(later) >= 99  # no progress for 100 s (clock passed in)
        loader.touch()  # a chunk arrived
        assert loader.stalled_for(time.monotonic()) < 5
        release.set()
        done = inbox.get(timeout=10)
        assert done.error is None and done.job.model == "m"
        assert loader.stalled_for(later) == 0.0  # idle again before the result was queued
    finally:
        release.set()
        loader.stop()
        loader.join(10)
    assert loader.stalled_for(time.monotonic() + 100) > 0  # a dead loader is not healthy


def test_unhealthy_names_a_dead_io_thread_or_a_stuck_loader() -> None:
    from blockllm.worker.loader import unhealthy

    class Thread:
        def __init__(self, alive: bool) -> None:
            self.alive = alive

        def is_alive(self) -> bool:
            return self.alive

    assert unhealthy(Thread(True), None, 1.0) == ""
    assert "IO thread" in unhealthy(Thread(False), None, 1.0)
    stuck = StageLoader(lambda m, s, e: {}, None, queue.SimpleQueue())  # never started: dead
    assert "loader stuck" in unhealthy(Thread(True), stuck, -1.0)


def test_rate_limited_log_holds_back_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from blockllm.broker.ratelog import RateLimitedLog

    log = RateLimitedLog(logging.getLogger("t.ratelog"), interval_s=10.0)
    with caplog.at_level(logging.WARNING, logger="t.ratelog"):
        assert log.log("k", "bad %s", 1, now=0.0)
        assert not log.log("k", "bad %s", 2, now=1.0)
        assert not log.log("k", "bad %s", 3, now=2.0)
        assert log.log("other", "other", now=2.0)
        assert log.log("k", "bad %s", 4, now=11.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["bad 1", "other", "bad 4 (and 2 more like it in 11 s)"]
