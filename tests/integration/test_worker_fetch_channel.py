"""The worker's IO thread as the fetch channel: FETCH out over its one DEALER, answers routed.

The test is the broker (`FakeBroker`, a real ROUTER) and drives a real `IOThread`: a BLOB or
ERROR carrying a pending fetch's request id goes to that fetcher and never to the compute
inbox; a BLOB nobody waits for is dropped; other messages still reach the inbox; before the
worker's first READY the IO thread sends no heartbeats (the broker does not know it yet).
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

import pytest
import torch

from blockllm.broker.protocol import (
    Blob,
    Error,
    Fetch,
    Heartbeat,
    Kind,
    Ready,
    Release,
    TensorMeta,
)
from blockllm.worker.config import WorkerProcConfig
from blockllm.worker.fetch import FetchError, fetch_model
from blockllm.worker.proc_io import IOThread, Reset
from blockllm.zoo import Zoo
from tests.integration.cluster import FakeBroker, make_zoo


@pytest.fixture
def channel():
    broker = FakeBroker()
    cfg = WorkerProcConfig(
        broker.endpoint,
        "",
        name="w0",
        heartbeat_interval_s=0.05,
        fetch_timeout_s=1.0,
        dead_linger_ms=0,
    )
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    io = IOThread(cfg, b"w0", inbox, Heartbeat)  # load facts: empty ones
    io.start()
    yield broker, io, inbox
    io.stop()
    io.join(10)
    broker.close()


def in_thread(fn, *args):
    """Run fn(*args) on a thread (as the loader would); its result or exception, later."""
    box: queue.SimpleQueue = queue.SimpleQueue()

    def run():
        try:
            box.put((True, fn(*args)))
        except Exception as e:
            box.put((False, e))

    threading.Thread(target=run, daemon=True).start()
    return box


@pytest.mark.timeout(60)
def test_answers_go_to_the_waiting_fetcher_not_the_inbox(channel):
    broker, io, inbox = channel
    box = in_thread(io.fetch, Fetch("", "block", "a" * 64, 0))
    peer, ask, _ = broker.recv_kind({Kind.FETCH}, timeout=10)
    assert peer == b"w0" and ask.request_id  # its own id, over the worker's identity
    data = torch.arange(10, dtype=torch.uint8)
    meta = (TensorMeta("uint8", (10,)),)
    broker.send(peer, Blob("stale", "block", "a" * 64, 0, 10, meta), [data])  # nobody waits
    broker.send(peer, Release("r1"))  # compute-loop traffic
    broker.send(peer, Blob(ask.request_id, "block", "a" * 64, 0, 10, meta), [data])
    ok, (msg, tensors) = box.get(timeout=10)
    assert ok and isinstance(msg, Blob) and torch.equal(tensors[0], data)
    box = in_thread(io.fetch, Fetch("", "manifest", "nope", 0))
    _, ask, _ = broker.recv_kind({Kind.FETCH}, timeout=10)
    broker.send(peer, Error(ask.request_id, "UNKNOWN_MODEL", "no such model"))
    ok, (msg, _) = box.get(timeout=10)
    assert ok and isinstance(msg, Error) and msg.code == "UNKNOWN_MODEL"
    got, _ = inbox.get(timeout=10)
    assert got == Release("r1")
    assert inbox.empty()  # neither BLOB nor the ERROR reached the compute loop
    assert io.fetch_chunks == 2


@pytest.mark.timeout(60)
def test_no_heartbeat_before_ready_and_a_silent_broker_fails_the_fetch(channel):
    broker, io, _ = channel
    box = in_thread(io.fetch, Fetch("", "block", "b" * 64, 0))
    ok, err = box.get(timeout=10)  # fetch_timeout_s = 1 s: nobody answers
    assert not ok and isinstance(err, FetchError)
    # Only the FETCH went out over 20 beats: no heartbeat before READY. Then READY arms it.
    _, msg, _ = broker.recv(timeout=1)
    assert msg.KIND is Kind.FETCH
    io.send(Ready(1, "w0", 1, "h", "cpu"))
    assert broker.recv(timeout=5)[1].KIND is Kind.READY


@pytest.mark.timeout(60)
def test_fetch_model_over_the_channel_stores_a_verified_model(channel, tiny_checkpoint, tmp_path):
    from blockllm.broker.fetch import serve_fetch

    broker, io, _ = channel
    src = make_zoo(tmp_path / "src", {"llama": tiny_checkpoint("llama")})
    dst = Zoo(tmp_path / "dst")
    box = in_thread(fetch_model, io.fetch, dst, "llama")
    while box.empty():  # the test serves each FETCH, in chunks of 100 kB (many round trips)
        try:
            peer, ask, _ = broker.recv_kind({Kind.FETCH}, timeout=0.2)
        except TimeoutError:
            continue
        small = Fetch(ask.request_id, ask.what, ask.name, ask.offset, 100_000)
        answer, data = serve_fetch(Path(src), small)
        broker.send(
            peer, answer, [torch.frombuffer(bytearray(data), dtype=torch.uint8)] if data else []
        )
    ok, nbytes = box.get(timeout=10)
    assert ok and nbytes > 0, nbytes
    assert dst.list_models() == ["llama"] and dst.verify().ok


@pytest.mark.timeout(60)
def test_reconnected_is_logged_only_when_the_broker_answers(channel, caplog):
    """Issue 19.7: a worker logged "reconnected" on every backoff attempt while no broker ran.
    The broker (the test) stays silent through two attempts: no such line; then it answers the
    new connection: one line."""
    broker, io, inbox = channel
    caplog.set_level(logging.INFO, logger="blockllm.worker")
    io.send(Ready(1, "w0", 1, "h", "cpu"))  # registered: liveness applies from now on
    assert broker.recv_kind({Kind.READY}, timeout=10)[1].KIND is Kind.READY
    resets = 0
    while resets < 2:  # two silent intervals: two new connections, each a Reset
        item = inbox.get(timeout=20)
        resets += isinstance(item, Reset)
    assert "reconnected" not in caplog.text
    io.send(Ready(1, "w0", 1, "h", "cpu"))  # what the compute loop does on a Reset
    peer, _, _ = broker.recv_kind({Kind.READY}, timeout=20)
    broker.send(peer, Heartbeat())
    broker.recv_kind({Kind.HEARTBEAT}, timeout=20)  # its pong: the answer was handled
    lines = [r.getMessage() for r in caplog.records if "reconnected" in r.getMessage()]
    assert len(lines) == 1 and "attempts" in lines[0]
