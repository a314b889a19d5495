"""Injected worker faults: SIGKILL mid-generation, the `fault_after_steps` hook.

With spare capacity the broker replays the request (its prompt + generated tokens) on another
worker and the client gets exactly HF's tokens; without, a typed error arrives, never a hang.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from blockllm.broker import frames
from blockllm.broker.protocol import Dead, Forward, Kind
from blockllm.client.errors import BlockLLMError
from blockllm.client.launcher import Launcher
from blockllm.worker.config import EXIT_FATAL, EXIT_FAULT, FaultMode
from tests.integration.cluster import (
    SLOW_BEAT,
    FakeBroker,
    cluster,
    hf_greedy,
    worker_config,
)

PROMPT = [11, 23, 5, 77, 140, 9]
LONG = 240  # new tokens: long enough that a kill after the first few lands mid-generation


@pytest.fixture(scope="module")
def want(llama: Path) -> list[int]:
    tokens = hf_greedy(llama, PROMPT, LONG)
    assert len(tokens) >= 100, "the reference stops (EOS) too early: pick another prompt"
    return tokens


def serving_worker(client) -> str:
    """The worker the running request is routed through (the only one with work)."""
    workers = client.status()["workers"]
    busy = [w["name"] for w in workers if w["inflight"] > 0]
    assert len(busy) == 1, f"expected one worker with the request, got {workers}"
    return busy[0]


def test_sigkill_mid_generation_replays_on_the_spare_worker(zoo: Path, want: list[int]):
    full = ["m:0-6"]
    with cluster(zoo, {"w0": full, "w1": full}, ["m"]) as c, c.client(timeout=120) as client:
        tokens, after_kill = [], 0
        for ev in client.stream("m", input_ids=PROMPT, max_new_tokens=LONG):
            tokens.append(ev.token_id)
            if len(tokens) == 3:
                victim = serving_worker(client)
                c.launcher.kill_worker(victim, signal.SIGKILL)
            elif len(tokens) > 3:
                after_kill += 1
        assert tokens == want
        assert after_kill > 0, "the request finished before the kill: nothing was tested"
        status = client.status()
        assert status["counters"]["replays"] >= 1
        assert [w["name"] for w in status["workers"]] == [n for n in ("w0", "w1") if n != victim]


def test_sigkill_without_spare_capacity_is_a_typed_error(zoo: Path):
    with cluster(zoo, {"w0": ["m:0-3"], "w1": ["m:3-6"]}, ["m"]) as c, c.client() as client:
        t0 = time.monotonic()
        with pytest.raises(BlockLLMError) as info:
            for ev in client.stream("m", input_ids=PROMPT, max_new_tokens=LONG, timeout=4.0):
                if ev.index == 2:
                    c.launcher.kill_worker("w1", signal.SIGKILL)
        assert info.value.code in ("NO_ROUTE", "TIMEOUT", "WORKER_LOST")
        assert time.monotonic() - t0 < 30
        assert not client.status()["models"]["m"]["covered"]


def test_fault_hook_raise_sends_dead_and_exits_nonzero(zoo: Path):
    broker = FakeBroker()
    try:
        with Launcher(stop_timeout=10) as launcher:
            cfg = worker_config(
                broker.endpoint,
                zoo,
                "w0",
                ["m:0-6"],
                fault_after_steps=3,
                heartbeat_interval_s=SLOW_BEAT,
            )
            proc = launcher.start_worker("w0", cfg)
            peer, ready, _ = broker.recv_kind({Kind.READY}, timeout=60)
            key, x, past = ready.stages[0].key, torch.tensor(PROMPT), 0
            for step in range(3):  # three steps are answered...
                fwd = Forward("r", step, (key,), past, 64, tensors=(frames.meta_of(x),))
                broker.send(peer, fwd, [x])
                _, msg, _ = broker.recv_kind({Kind.RESULT})
                past, x = past + len(x), torch.tensor([msg.token_id])
            _, dead, _ = broker.recv_kind({Kind.DEAD})  # ...then the fault: DEAD, exit 1
            assert isinstance(dead, Dead) and "InjectedFault" in dead.reason
            assert launcher.wait_exit(proc, 30) == EXIT_FATAL
    finally:
        broker.close()


def test_fault_hook_exit_is_a_crash(zoo: Path):
    broker = FakeBroker()
    try:
        with Launcher(stop_timeout=10) as launcher:
            cfg = worker_config(
                broker.endpoint,
                zoo,
                "w0",
                ["m:0-6"],
                heartbeat_interval_s=SLOW_BEAT,
                fault_after_steps=1,
                fault_mode=FaultMode.EXIT,
            )
            proc = launcher.start_worker("w0", cfg)
            peer, ready, _ = broker.recv_kind({Kind.READY}, timeout=60)
            x = torch.tensor(PROMPT)
            fwd = Forward("r", 0, (ready.stages[0].key,), 0, 64, tensors=(frames.meta_of(x),))
            broker.send(peer, fwd, [x])
            assert launcher.wait_exit(proc, 30) == EXIT_FAULT
            assert [d.name for d in launcher.deaths] in ([], ["w0"])  # reported, if seen yet
    finally:
        broker.close()


def test_dead_worker_is_replaced_by_one_that_joins_later(zoo: Path, want: list[int]):
    """A worker that fails (DEAD) leaves no route; the request waits for one, and a worker
    started afterwards picks it up by replay: same tokens as HF."""
    n = 60
    kw = {"w0": {"fault_after_steps": 8}}
    with cluster(zoo, {"w0": ["m:0-6"]}, ["m"], worker_kw=kw) as c, c.client() as client:
        tokens = []
        for ev in client.stream("m", input_ids=PROMPT, max_new_tokens=n, timeout=90):
            tokens.append(ev.token_id)
            if ev.index == 0:
                c.add_worker("w1", ["m:0-6"])
        assert tokens == want[:n]
        # w1 (forked, ready within a second) may finish the replay before w0 has left
        assert c.launcher.wait_exit("w0", 30) == EXIT_FATAL
        deadline = time.monotonic() + 10
        while not c.launcher.deaths and time.monotonic() < deadline:
            threading.Event().wait(0.05)  # the monitor thread reports the exit it saw
        deaths = [(d.name, d.exitcode) for d in c.launcher.deaths]
        assert deaths == [("w0", EXIT_FATAL)]
