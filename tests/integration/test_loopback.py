"""Worker and broker processes on 127.0.0.1: handshake, liveness, streaming, clean shutdown.

The first tests put the test itself in the broker's seat (a real ROUTER socket) to check the
worker process's side of the protocol exactly; the last one runs the real broker and two
workers and streams a request through both.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from blockllm.broker import frames
from blockllm.broker.protocol import (
    PROTOCOL_VERSION,
    Dead,
    Error,
    Forward,
    Heartbeat,
    Kind,
    Ready,
    Release,
    Result,
)
from blockllm.client.launcher import Launcher
from blockllm.zoo import Zoo
from blockllm.zoo.chain import stage_key
from tests.integration.cluster import (
    SLOW_BEAT,
    FakeBroker,
    cluster,
    hf_greedy,
    hf_tokenize,
    worker_config,
)

PROMPT_IDS = [5, 17, 42, 99, 7]
NEW_TOKENS = 12


@pytest.fixture
def fake_broker():
    fb = FakeBroker()
    yield fb
    fb.close()


def forward(req: str, step: int, keys: tuple[str, ...], past: int, x: torch.Tensor) -> Forward:
    return Forward(req, step, keys, past, 64, tensors=(frames.meta_of(x),))


def greedy_via(fb: FakeBroker, hops: list[tuple[bytes, tuple[str, ...]]], req: str) -> list[int]:
    """Drive one request through `hops` by hand, as the broker would: NEW_TOKENS greedy."""
    x = torch.tensor(PROMPT_IDS)
    past, out = 0, []
    for step in range(NEW_TOKENS):
        ids = x
        for peer, keys in hops:
            fb.send(peer, forward(req, step, keys, past, x), [x])
            _, msg, tensors = fb.recv_kind({Kind.RESULT, Kind.ERROR})
            assert isinstance(msg, Result), msg
            x = tensors[0] if tensors else x
        out.append(msg.token_id)
        past += ids.shape[0]
        x = torch.tensor([msg.token_id])
    return out


def test_worker_ready_forward_heartbeat_and_sigterm(zoo: Path, llama: Path, fake_broker):
    want = hf_greedy(llama, PROMPT_IDS, NEW_TOKENS)
    with Launcher(stop_timeout=10) as launcher:
        proc = launcher.start_worker(
            "w0", worker_config(fake_broker.endpoint, zoo, "w0", ["m:0-6"])
        )
        peer, ready, _ = fake_broker.recv_kind({Kind.READY}, timeout=60)
        assert isinstance(ready, Ready)
        assert peer == b"w0"
        assert (ready.protocol_version, ready.name, ready.pid) == (PROTOCOL_VERSION, "w0", proc.pid)
        (stage,) = ready.stages
        assert (stage.model, stage.start, stage.end) == ("m", 0, 6)
        assert stage.key == stage_key(Zoo(zoo).manifest("m"), 0, 6)
        assert ready.kv_total_bytes > 0 and ready.kv_free_bytes == ready.kv_total_bytes
        assert ready.free_slots > 0 and ready.max_batch_size == 32

        tokens = greedy_via(fake_broker, [(peer, (stage.key,))], "r1")
        assert tokens == want

        fake_broker.send(peer, Heartbeat())  # a ping is answered with the load facts
        _, pong, _ = fake_broker.recv_kind({Kind.HEARTBEAT})
        assert isinstance(pong, Heartbeat)
        assert pong.steps >= NEW_TOKENS and pong.rss_bytes > 0 and pong.step_ms_p50 > 0
        assert pong.kv_free_bytes < ready.kv_total_bytes  # r1 still holds its KV
        fake_broker.send(peer, Release("r1"))
        # The IO thread answers pings at once with the compute loop's latest snapshot, so
        # the release shows up in the facts soon after, not necessarily in the next pong.
        deadline = time.monotonic() + 10
        while pong.kv_free_bytes != ready.kv_total_bytes and time.monotonic() < deadline:
            fake_broker.send(peer, Heartbeat())
            _, pong, _ = fake_broker.recv_kind({Kind.HEARTBEAT})
        assert pong.kv_free_bytes == ready.kv_total_bytes

        assert not launcher.deaths  # nothing died on its own before the stop
        # SIGTERM: drain, DEAD("shutdown"), exit 0 (an expected exit: not reported as a death,
        # which a bare proc.terminate() would race the launcher's monitor over)
        launcher.kill_worker("w0", signal.SIGTERM)
        _, dead, _ = fake_broker.recv_kind({Kind.DEAD})
        assert isinstance(dead, Dead) and dead.reason == "shutdown"
        assert launcher.wait_exit(proc, 30) == 0


def test_two_workers_pass_hidden_states(zoo: Path, llama: Path, fake_broker):
    """Stage output travels as a raw tensor frame from one worker to the next."""
    want = hf_greedy(llama, PROMPT_IDS, NEW_TOKENS)
    with Launcher(stop_timeout=10) as launcher:
        for name, stages in (("a", ["m:0-3"]), ("b", ["m:3-5", "m:5-6"])):
            launcher.start_worker(
                name,
                worker_config(
                    fake_broker.endpoint, zoo, name, stages, heartbeat_interval_s=SLOW_BEAT
                ),
            )
        readies = {}
        while len(readies) < 2:
            peer, msg, _ = fake_broker.recv_kind({Kind.READY}, timeout=60)
            readies[peer] = msg
        keys_a = tuple(s.key for s in readies[b"a"].stages)
        keys_b = tuple(s.key for s in readies[b"b"].stages)  # two stages run in one hop
        assert len(keys_b) == 2
        fake_broker.send(
            b"a", forward("h", 0, keys_a, 0, torch.tensor(PROMPT_IDS)), [torch.tensor(PROMPT_IDS)]
        )
        _, msg, (hidden,) = fake_broker.recv_kind({Kind.RESULT})
        assert hidden.dtype == torch.float32 and hidden.shape == (len(PROMPT_IDS), 64)
        fake_broker.send(b"a", Release("h"))
        tokens = greedy_via(fake_broker, [(b"a", keys_a), (b"b", keys_b)], "r2")
        assert tokens == want


def test_worker_reconnects_and_drops_kv_when_broker_is_silent(zoo: Path, fake_broker):
    with Launcher(stop_timeout=10) as launcher:
        cfg = worker_config(fake_broker.endpoint, zoo, "w0", ["m:0-6"], heartbeat_interval_s=0.2)
        launcher.start_worker("w0", cfg)
        peer, ready, _ = fake_broker.recv_kind({Kind.READY}, timeout=60)
        key = ready.stages[0].key
        x = torch.tensor(PROMPT_IDS)
        fake_broker.send(peer, forward("r", 0, (key,), 0, x), [x])
        fake_broker.recv_kind({Kind.RESULT})
        # Now say nothing: after 3 beats the worker reconnects and announces itself again.
        _, again, _ = fake_broker.recv_kind({Kind.READY}, timeout=10)
        assert again.kv_free_bytes == again.kv_total_bytes  # it dropped r's KV
        nxt = torch.tensor([3])
        fake_broker.send(peer, forward("r", 1, (key,), len(PROMPT_IDS), nxt), [nxt])
        _, err, _ = fake_broker.recv_kind({Kind.ERROR})
        assert isinstance(err, Error) and err.code == "KV_MISS" and err.retryable


def test_broker_and_two_workers_stream_and_stop_cleanly(zoo: Path, llama: Path):
    prompt = "Return the value of the"
    ids = hf_tokenize(llama, prompt)
    want = hf_greedy(llama, ids, 16)
    with cluster(zoo, {"w0": ["m:0-3"], "w1": ["m:3-6"]}, ["m"]) as c:
        pids = {p.pid for p in c.launcher.workers.values()} | {c.launcher.broker.pid}
        with c.client() as client:
            status = client.status()
            assert {w["name"] for w in status["workers"]} == {"w0", "w1"}
            assert status["models"]["m"]["covered"]
            events = list(client.stream("m", prompt=prompt, max_new_tokens=16))
        assert [e.token_id for e in events] == want
        assert [e.index for e in events] == list(range(len(want)))
        assert events[-1].finish_reason in ("stop", "length")
        assert all(e.finish_reason is None for e in events[:-1])
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_sigint_to_a_worker_is_a_clean_stop(zoo: Path, fake_broker):
    with Launcher(stop_timeout=10) as launcher:
        proc = launcher.start_worker(
            "w0", worker_config(fake_broker.endpoint, zoo, "w0", [], heartbeat_interval_s=SLOW_BEAT)
        )
        fake_broker.recv_kind({Kind.READY}, timeout=60)
        launcher.kill_worker("w0", signal.SIGINT)
        _, dead, _ = fake_broker.recv_kind({Kind.DEAD})
        assert dead.reason == "shutdown"
        assert launcher.wait_exit(proc, 30) == 0
