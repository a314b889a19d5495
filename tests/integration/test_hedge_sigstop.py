"""Hedged steps across real processes (issue 14, item 4): two workers each hold the whole
chain; while greedy streams decode, the worker serving some of them is frozen with SIGSTOP.
Its decode hops go late, the broker hedges them on the other worker (a re-sent prefill), the
first answer wins, and after SIGCONT the frozen worker's late answers are dropped. Every
output equals HF `generate`, and both workers' KV pools are empty again once idle (the losing
attempts were RELEASEd, nothing leaked).

The broker's liveness is long enough (10 s) that the frozen worker is late, not lost: this is
hedging, not the replay after a death (tests/fault/test_worker_death.py).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.integration.cluster import FAST_BEAT, cluster, hf_greedy
from tests.integration.test_planner import Streams, wait_status

PROMPTS = [[11, 23, 5, 77, 140, 9], [3, 14, 15, 92, 65], [27, 18, 28, 18, 28, 45, 90], [99, 1]]
NEW_TOKENS = 40


def kv_idle(body: dict) -> bool:
    return (
        all(
            w["kv_free_bytes"] == w["kv_total_bytes"] and w["inflight"] == 0
            for w in body["workers"]
        )
        and len(body["workers"]) == 2
    )


@pytest.mark.timeout(240)
def test_a_frozen_worker_is_hedged_first_answer_wins_nothing_leaks(zoo: Path, llama: Path):
    want = [hf_greedy(llama, p, NEW_TOKENS) for p in PROMPTS]
    full = ["m:0-6"]
    broker = {"liveness": round(10 / FAST_BEAT), "hedge_after_s": 0.5}
    with cluster(zoo, {"w0": full, "w1": full}, ["m"], broker=broker) as c:
        streams = Streams(c, [("m", p, NEW_TOKENS) for p in PROMPTS])
        streams.started.wait(60)  # every stream has its first tokens: all are decoding
        body = wait_status(c, lambda b: any(w["inflight"] for w in b["workers"]), 10, "busy")
        frozen = max(body["workers"], key=lambda w: w["inflight"])["name"]
        pid = c.launcher.workers[frozen].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            body = wait_status(
                c, lambda b: b["counters"]["hedges_won"] >= 1, 8, "a hedged step won"
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        assert body["counters"]["workers_expired"] == 0  # late, never lost
        got = streams.join()
        assert got == want
        body = wait_status(c, kv_idle, 30, "both KV pools empty again")
        counters = body["counters"]
        assert counters["hedges"] >= counters["hedges_won"] >= 1
        assert counters["failed"] == 0 and counters["workers_expired"] == 0
