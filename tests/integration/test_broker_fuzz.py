"""The real broker process on 127.0.0.1:0: thousands of malformed messages never crash or stall
it, a fake-worker round trip over real sockets, and SIGTERM gives exit code 0.

No sleeps as synchronisation: every wait is a poll with a deadline.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from blockllm.broker import frames
from blockllm.broker.config import BrokerConfig
from blockllm.broker.proc import run_broker_process
from blockllm.broker.protocol import (
    MAX_FRAMES,
    PROTOCOL_VERSION,
    Cancel,
    Dead,
    Error,
    Forward,
    Generate,
    Heartbeat,
    Kind,
    Ready,
    Release,
    Result,
    StageRef,
    Status,
    StatusBody,
    StatusRequest,
    TensorMeta,
    Token,
)

N_FUZZ = 3000
START_TIMEOUT_S = 60.0


class BrokerChild:
    """A broker in a spawned process, its endpoint, and a context for test sockets."""

    def __init__(self, zoo_dir: Path, **cfg: object) -> None:
        mp = multiprocessing.get_context("spawn")
        recv_end, send_end = mp.Pipe(duplex=False)
        config = BrokerConfig(
            bind="tcp://127.0.0.1:0",
            zoo_dir=str(zoo_dir),
            ready_conn=send_end,
            parent_pid=os.getpid(),
            log_level="WARNING",
            **cfg,
        )
        self.proc = mp.Process(target=run_broker_process, args=(config,), name="broker")
        self.proc.start()
        send_end.close()
        if not recv_end.poll(START_TIMEOUT_S):
            raise AssertionError(f"broker not ready after {START_TIMEOUT_S}s")
        self.endpoint = recv_end.recv_bytes().decode()
        recv_end.close()
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []

    def dealer(self, identity: bytes | None = None) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.sndtimeo = 10_000  # a stalled broker fails the test instead of hanging it
        if identity is not None:
            s.identity = identity
        s.connect(self.endpoint)
        self.sockets.append(s)
        return s

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, join; the exit code. Idempotent."""
        if self.ctx.closed:
            return self.proc.exitcode
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGTERM)
        self.proc.join(timeout)
        for s in self.sockets:
            s.close(linger=0)
        self.ctx.term()
        return self.proc.exitcode


def recv(sock: zmq.Socket, timeout: float = 10.0) -> tuple[object, list]:
    if not sock.poll(int(timeout * 1000)):
        raise AssertionError(f"nothing received within {timeout}s")
    parts = sock.recv_multipart(copy=False)
    return frames.decode_header(parts), parts[2:]


def recv_kind(sock: zmq.Socket, kind: type, timeout: float = 10.0):
    """The next message of `kind` (skipping others, e.g. pings), within the deadline."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        msg, rest = recv(sock, left)
        if isinstance(msg, kind):
            return msg, rest
    raise AssertionError(f"no {kind.__name__} within {timeout}s")


def status(sock: zmq.Socket, rid: str = "s") -> StatusBody:
    sock.send_multipart(frames.encode(StatusRequest(rid)))
    msg, _ = recv_kind(sock, Status, 20.0)
    return msg.body


@pytest.fixture(scope="module")
def tiny_zoo(tiny_checkpoint: Callable[..., Path], tmp_path_factory) -> Path:
    from blockllm.zoo import Zoo

    root = tmp_path_factory.mktemp("zoo")
    Zoo(root).import_checkpoint(tiny_checkpoint("llama"), "tiny")
    return root


@pytest.fixture
def start_broker(tiny_zoo: Path) -> Iterator[Callable[..., BrokerChild]]:
    """Factory: a broker child on the tiny zoo; stopped after the test whatever happens."""
    children: list[BrokerChild] = []

    def start(**cfg: object) -> BrokerChild:
        children.append(BrokerChild(tiny_zoo, **cfg))
        return children[-1]

    yield start
    for child in children:
        child.stop()


# -- the fuzz corpus ---------------------------------------------------------------------------


def _header(values: object) -> bytes:
    return msgpack.packb(values, use_bin_type=True)


def _valid_ish(rng: random.Random) -> list[bytes]:
    """Well-formed messages the broker must refuse or shrug off (wrong sender, bad values)."""
    msgs = [
        Generate("g", "tiny", None, (rng.randrange(-5, 10**6),), rng.randrange(-3, 10**7)),
        Generate("g2", "tiny", "x" * rng.randrange(0, 50), (1,), 4, -1.0, -3, 7.5),
        Generate("g3", "nope", "hi"),
        Generate("", "tiny", "hi"),
        Cancel(f"c{rng.random()}"),
        Ready(PROTOCOL_VERSION + 1, "bad", 1, "h", "cpu"),
        Heartbeat(free_slots=-4, queue_depths={"x": -1}),
        Dead("fuzz"),
        Result("nobody", rng.randrange(100), token_id=rng.randrange(-10, 10)),
        Error("nobody", "KV_MISS", "fuzz", True, 3),
        Token("t", 0, 1, "x"),
        Status("s", StatusBody()),
        Release("r"),
    ]
    out = frames.encode(rng.choice(msgs))
    if rng.random() < 0.3:  # a FORWARD (never accepted by the broker), sizes right or wrong
        header = _header(["r", 1, ["k"], 0, 8, 0.0, 0, 1.0, 0, [["float32", [1, 4]]]])
        return [Kind.FORWARD.value, header, b"\0" * rng.choice((0, 15, 16, 17))]
    if rng.random() < 0.2:
        return [*out, b"extra frame"]
    return out


def fuzz_message(rng: random.Random) -> list[bytes]:
    kinds = [k.value for k in Kind]
    choice = rng.randrange(11)
    if choice == 0:  # random frames
        return [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 6))]
    if choice == 1:  # known kind, random header bytes
        return [rng.choice(kinds), rng.randbytes(rng.randrange(0, 200))]
    if choice == 2:  # known kind, msgpack of the wrong shape or types
        junk = rng.choice([None, 1, "s", {"a": 1}, [None] * 20, [1.5, b"b", [], {}], [[[[]]]]])
        return [rng.choice(kinds), _header(junk)]
    if choice == 3:  # truncated header of a real message
        wire = frames.encode(Generate("r", "tiny", "hello", None, 8))
        return [wire[0], wire[1][: rng.randrange(0, len(wire[1]))]]
    if choice == 4:  # unknown kinds
        return [rng.choice([b"", b"Z", b"\xff", b"RR", b"\x00"]), _header(["r"])]
    if choice == 5:  # huge or bad shapes
        shape = rng.choice([[1 << 40, 1 << 40], [-1], [1] * 9, [1 << 62, 4]])
        dtype = rng.choice(["float32", "complex64", "bfloat16", ""])
        header = _header(["r", 1, 0, 0.0, [[dtype, shape]]])
        return [Kind.RESULT.value, header, b"\0" * 16]
    if choice == 6:  # frame-count mismatches
        meta = [["float32", [2]]]
        n = rng.choice([0, 2, 3])
        return [Kind.RESULT.value, _header(["r", 1, -1, 0.0, meta]), *([b"\0" * 8] * n)]
    if choice == 7:  # too many frames
        return [Kind.STATUS_REQUEST.value, _header(["s"]), *([b""] * MAX_FRAMES)]
    if choice == 8:  # a READY with nonsense stages (registered: a worker that hosts nothing)
        stages = [[rng.randbytes(4).hex(), "tiny", rng.randrange(-2, 9), rng.randrange(-2, 9)]]
        return [Kind.READY.value, _header([PROTOCOL_VERSION, "fz", 1, "h", "cpu", stages])]
    if choice == 9:  # wrong field types in an otherwise valid GENERATE
        return [Kind.GENERATE.value, _header(["r", "tiny", 5, "ids", "many", True])]
    return _valid_ish(rng)


def test_fuzz_never_crashes_or_stalls(start_broker: Callable[..., BrokerChild]) -> None:
    broker = start_broker(heartbeat_s=0.5, max_waiting=64, default_timeout_s=2.0)
    rng = random.Random(20240601)
    before = status(broker.dealer()).counters["bad_messages"]
    senders = [broker.dealer(f"fuzz{i}".encode()) for i in range(4)]
    quitter = broker.dealer(b"quitter")
    for _ in range(50):  # replies to this one find it gone: EHOSTUNREACH is a lost peer
        quitter.send_multipart([b"?", b""])
    quitter.close(linger=0)
    for i in range(N_FUZZ):
        senders[i % len(senders)].send_multipart(fuzz_message(rng))
    # the broker answers a fresh client, and has counted the garbage (poll with a deadline)
    probe = broker.dealer()
    deadline = time.monotonic() + 60
    while True:
        body = status(probe)
        grown = body.counters["bad_messages"] - before
        if grown >= N_FUZZ // 3 or time.monotonic() > deadline:
            break
    assert grown >= N_FUZZ // 3, body.counters
    assert body.counters["internal_errors"] == 0
    assert broker.proc.is_alive()
    # and it still serves: a valid request for a model nothing covers fails typed
    probe.send_multipart(frames.encode(Generate("after", "tiny", "hello", None, 4, timeout_s=0.5)))
    err, _ = recv_kind(probe, Error, 20.0)
    assert err.request_id == "after" and err.code in ("NO_ROUTE", "TIMEOUT")
    assert broker.stop() == 0


def test_fake_workers_round_trip_over_sockets(
    start_broker: Callable[..., BrokerChild], tiny_zoo: Path
) -> None:
    """Two DEALERs act as workers for the tiny model (positions [0, 3) and [3, L+2)): the
    broker forwards the hidden frame byte-exact, streams the token, and releases both; on
    SIGTERM a running request fails after the drain and the broker exits 0."""
    from blockllm.zoo import Zoo
    from blockllm.zoo.chain import stage_key

    # the fake workers do not answer pings; SIGTERM gives running requests half a second
    broker = start_broker(heartbeat_s=30.0, drain_timeout_s=0.5)
    m = Zoo(tiny_zoo).manifest("tiny")
    n = len(m.chain)
    spans = {b"wa": (0, 3), b"wb": (3, n)}
    workers = {}
    for ident, (s, e) in spans.items():
        sock = broker.dealer(ident)
        stage = StageRef(stage_key(m, s, e), "tiny", s, e)
        ready = Ready(
            PROTOCOL_VERSION, ident.decode(), 1, "h", "cpu", (stage,), 1 << 30, 1 << 30, 8, 4
        )
        sock.send_multipart(frames.encode(ready))
        workers[ident] = sock
    client = broker.dealer(b"client")
    deadline = time.monotonic() + 20
    while not status(client).models["tiny"].covered:
        assert time.monotonic() < deadline, "workers never registered"
    client.send_multipart(frames.encode(Generate("r1", "tiny", None, (5, 6, 7), 1)))
    fwd, rest = recv_kind(workers[b"wa"], Forward)
    assert fwd.past_len == 0 and fwd.tensors == (TensorMeta("int64", (3,)),)
    assert struct.unpack("<3q", rest[0].bytes) == (5, 6, 7)
    hidden = bytes(range(256)) * 3  # [3, 64] float32: the 3 prompt positions, hidden 64
    meta = (TensorMeta("float32", (3, 64)),)
    result = Result(fwd.request_id, fwd.step, tensors=meta)
    workers[b"wa"].send_multipart(frames.encode_passthrough(result, [hidden]))
    fwd2, rest2 = recv_kind(workers[b"wb"], Forward)
    assert fwd2.tensors == meta and rest2[0].bytes == hidden
    workers[b"wb"].send_multipart(frames.encode(Result(fwd2.request_id, fwd2.step, token_id=9)))
    tok, _ = recv_kind(client, Token)
    assert (tok.request_id, tok.token_id, tok.finish_reason) == ("r1", 9, "length")
    for sock in workers.values():
        rel, _ = recv_kind(sock, Release)
        assert rel.request_id == fwd.request_id
    # SIGTERM while a request runs: after the drain it is answered SHUTTING_DOWN (the client
    # resumes it on the next broker), its hops are freed
    client.send_multipart(frames.encode(Generate("r2", "tiny", None, (5, 6), 4)))
    fwd, _ = recv_kind(workers[b"wa"], Forward)
    os.kill(broker.proc.pid, signal.SIGTERM)
    err, _ = recv_kind(client, Error)
    assert (err.request_id, err.code, err.retryable) == ("r2", "SHUTTING_DOWN", True)
    assert recv_kind(workers[b"wa"], Release)[0].request_id == fwd.request_id
    assert broker.stop() == 0
