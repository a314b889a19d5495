"""KV migration for real: engines in-process, then a broker and three worker processes on
127.0.0.1 where a running request's stage moves between workers. Greedy output is checked
against HF `generate`; the broker's counters tell a migration from a replay. No sleeps: waits
are on the token stream, process exits and STATUS, each with a deadline."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from blockllm.broker.planner.proc import send_command
from blockllm.broker.protocol import PlannedHop, PlannedRoute, SetRoutes
from tests.integration.cluster import Cluster, cluster, hf_greedy

PROMPT = [11, 23, 5, 77, 140, 9, 31, 4, 100, 66]
N_NEW = 48


@pytest.fixture(scope="module")
def want(llama: Path) -> list[int]:
    return hf_greedy(llama, PROMPT, N_NEW)


def test_engine_export_import_continues_bit_exactly(zoo: Path) -> None:
    from blockllm.worker.worker import Worker, WorkerConfig, WorkItem
    from blockllm.zoo import Zoo

    cfg = WorkerConfig(device="cpu", kv_budget_bytes=8 << 20, threads=1)
    a, b = Worker(Zoo(zoo), cfg), Worker(Zoo(zoo), cfg)
    key = a.load_stage("m", 0, 6).key
    assert b.load_stage("m", 0, 6).key == key
    total = len(PROMPT) + 8

    def run(w: Worker, step: int, tokens: list[int], past: int) -> int:
        item = WorkItem("r", step, (key,), past, tokens=torch.tensor(tokens), max_total_len=total)
        w.submit(item)
        (res,) = w.step()
        assert res.error is None, res.message
        return res.token_id

    t1 = run(a, 1, PROMPT, 0)
    t2 = run(a, 2, [t1], len(PROMPT))
    n = len(PROMPT) + 1
    k, v = a.export_kv("r", key, n)
    b.import_kv("r", key, k, v, total)
    assert b.kv_stats().used_bytes == a.kv_stats().used_bytes  # same reservation
    assert run(b, 3, [t2], n) == run(a, 3, [t2], n)  # both decode on from the same KV
    bk, bv = b.export_kv("r", key, n + 1)
    ak, av = a.export_kv("r", key, n + 1)
    assert torch.equal(bk, ak) and torch.equal(bv, av)


@pytest.fixture(scope="module")
def three(zoo: Path) -> Iterator[Cluster]:
    """w0 serves m's embedding and first layers; w1 and w2 both serve the rest (one stage)."""
    workers = {"w0": ["m:0-3"], "w1": ["m:3-6"], "w2": ["m:3-6"]}
    # w0's steps are slowed (test-only hook) so the request is still running when it moves
    kw = {"w0": {"fault_step_delay_s": 0.02}}
    with cluster(zoo, workers, ["m"], broker={"hedge_after_s": 0.0}, worker_kw=kw) as c:
        yield c


def routes(second: str) -> SetRoutes:
    hops = (PlannedHop("w0", ((0, 3),)), PlannedHop(second, ((3, 6),)))
    return SetRoutes(f"to-{second}", {"m": (PlannedRoute(hops, 1.0),)}, True)


def stream_and_move(c: Cluster, first: str, then) -> list[int]:
    """Stream PROMPT on w0 -> `first`; after 3 tokens call `then()` (the route change)."""
    assert send_command(c.endpoint, routes(first)).ok
    tokens: list[int] = []
    with c.client(timeout=60) as client:
        for k, ev in enumerate(client.stream("m", input_ids=PROMPT, max_new_tokens=N_NEW)):
            tokens.append(ev.token_id)
            if k == 2:
                then()
    return tokens


def counters(c: Cluster) -> dict[str, int]:
    with c.client() as client:
        return client.status(timeout=5)["counters"]


@pytest.mark.timeout(90)
def test_a_running_request_migrates_its_stage_and_output_stays_exact(
    three: Cluster, want: list[int]
) -> None:
    before = counters(three)
    got = stream_and_move(three, "w1", lambda: send_command(three.endpoint, routes("w2")))
    assert got == want
    c = {k: n - before[k] for k, n in counters(three).items()}
    # it moved by migration: no replay, no prefill on w2; w0 kept its KV in place
    assert c["migrations"] == 1 and c["migrations_failed"] == 0 and c["replays"] == 0
    assert c["moved"] == 1 and c["failed"] == 0
    # 2 decoder layers x (K + V) x 2 kv heads x 16 dims x fp32 per token, 12 tokens held
    assert c["migrated_bytes"] > 0


@pytest.mark.timeout(90)
def test_the_old_worker_sigkilled_falls_back_to_replay(three: Cluster, want: list[int]) -> None:
    def kill_then_move() -> None:  # w2 holds the request's KV of m:3-6; it dies, then moves
        three.launcher.kill_worker("w2", signal.SIGKILL)
        three.launcher.workers["w2"].join(10)
        assert send_command(three.endpoint, routes("w1")).ok

    before = counters(three)
    got = stream_and_move(three, "w2", kill_then_move)
    assert got == want  # nothing lost, nothing repeated
    c = {k: n - before[k] for k, n in counters(three).items()}
    assert c["replays"] + c["migrations_failed"] >= 1 and c["migrations"] == 0
    assert c["failed"] == 0, c
