"""The client (sync and asyncio) against the stand-in broker (tests/unit/client_standin.py)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockllm.broker.protocol import (
    Cancel,
    Generate,
    plain,
)
from blockllm.broker.sockets import CurveKeys
from blockllm.client import (
    AsyncClient,
    BadRequest,
    BlockLLMError,
    BrokerUnavailable,
    Client,
    Completion,
    ConnectionFailed,
    Overloaded,
    RequestFailed,
    Timeout,
    TokenEvent,
    UnknownModel,
)
from blockllm.client.errors import error_from
from tests.unit.client_standin import COVERED, PIECES, StandIn
from tests.unit.typed_bodies import status

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def client(peer: StandIn) -> Iterator[Client]:
    with Client(peer.addr, timeout=10) as c:
        yield c


# ---- sync client ---------------------------------------------------------------------------


def test_generate_returns_completion(client: Client) -> None:
    out = client.generate("base", prompt="Hello", max_new_tokens=4, seed=2)
    assert out == Completion([200, 201, 202, 203], "Hello,", "length", 5)


def test_generate_input_ids_and_stop(client: Client, peer: StandIn) -> None:
    out = client.generate("base", input_ids=[1, 2, 3], max_new_tokens=32)
    assert out.token_ids == list(range(6))
    assert out.text == "".join(PIECES)
    assert out.finish_reason == "stop"
    assert out.prompt_tokens == 3
    sent = peer.next_message(Generate)
    assert sent.input_ids == (1, 2, 3) and sent.prompt is None and sent.timeout_s == 10.0


def test_stream_events_concatenate(client: Client) -> None:
    events = list(client.stream("base", prompt="Hi", max_new_tokens=6))
    assert all(isinstance(e, TokenEvent) for e in events)
    assert [e.index for e in events] == list(range(6))
    assert "".join(e.text for e in events) == "".join(PIECES)
    assert events[3].text == ""
    assert [e.finish_reason for e in events] == [None] * 5 + ["length"]


def test_stream_timeout_sends_cancel(client: Client, peer: StandIn) -> None:
    # "silent" never answers: the first next() times out, and the generator's close cancels it
    events = client.stream("silent", prompt="Hi", timeout=0.3)
    sent = peer.next_message(Generate)
    with pytest.raises(Timeout):
        next(events)
    assert peer.next_message(Cancel).request_id == sent.request_id


def test_stream_break_cancels(client: Client, peer: StandIn) -> None:
    events = client.stream("drip", prompt="Hi")
    for ev in events:
        assert ev.text == "He"
        break
    events.close()
    sent = peer.next_message(Generate)
    assert peer.next_message(Cancel).request_id == sent.request_id


def test_cancel_sent_right_before_close_leaves(peer: StandIn) -> None:
    with Client(peer.addr) as c:
        events = c.stream("drip", prompt="Hi")
        next(events)
        events.close()
    sent = peer.next_message(Generate)
    assert peer.next_message(Cancel).request_id == sent.request_id


def test_sixteen_threads_share_one_client(client: Client) -> None:
    results: dict[int, Completion] = {}
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            results[seed] = client.generate("base", prompt="x", max_new_tokens=5, seed=seed)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    assert sorted(results) == list(range(16))
    for seed, out in results.items():
        assert out.token_ids == [seed * 100 + i for i in range(5)]


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("UNKNOWN_MODEL", UnknownModel),
        ("BAD_REQUEST", BadRequest),
        ("OVERLOADED", Overloaded),
        ("TIMEOUT", Timeout),
        ("WORKER_LOST", RequestFailed),
        ("NO_ROUTE", RequestFailed),
        ("INTERNAL", RequestFailed),
        ("SOMETHING_NEW", RequestFailed),
    ],
)
def test_error_codes_map_to_classes(client: Client, code: str, cls: type) -> None:
    with pytest.raises(cls) as info:
        client.generate(f"err-{code}", prompt="x")
    assert info.value.code == code
    assert info.value.message == f"stand-in {code}"
    assert info.value.retryable == (code == "WORKER_LOST")
    assert isinstance(info.value, BlockLLMError)


def test_unknown_model(client: Client) -> None:
    with pytest.raises(UnknownModel, match="nope"):
        client.generate("nope", prompt="x")


def test_error_from_is_typed() -> None:
    e = error_from("NO_ROUTE", "no worker holds layer 3", True)
    assert type(e) is RequestFailed and e.code == "NO_ROUTE" and e.retryable
    assert isinstance(error_from("TIMEOUT", "late"), TimeoutError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"prompt": "a", "input_ids": [1]},
        {"input_ids": []},
        {"input_ids": [1, -2]},
        {"prompt": "a", "max_new_tokens": 0},
        {"prompt": "a", "top_p": 0.0},
        {"prompt": "a", "temperature": -1.0},
    ],
)
def test_bad_arguments_fail_locally(client: Client, peer: StandIn, kwargs: dict) -> None:
    with pytest.raises(BadRequest):
        client.generate("base", **kwargs)
    assert peer.received.empty()


def test_client_timeout_when_peer_silent(client: Client, peer: StandIn) -> None:
    t0 = time.monotonic()
    with pytest.raises(Timeout, match=re.escape(peer.addr)):
        client.generate("silent", prompt="x", timeout=0.3)
    assert time.monotonic() - t0 < 2
    sent = peer.next_message(Generate)
    assert peer.next_message(Cancel).request_id == sent.request_id


def test_no_broker_is_a_clear_timeout() -> None:
    dead = StandIn()
    addr = dead.addr
    dead.close()  # nothing listens there now
    with Client(addr) as c:
        with pytest.raises(Timeout, match="not connected") as info:
            c.generate("base", prompt="x", timeout=0.3)
        assert addr in str(info.value)
        with pytest.raises(Timeout):
            c.status(timeout=0.3)


def test_unreachable_broker_without_deadline() -> None:
    dead = StandIn()
    dead.close()
    with Client(dead.addr, connect_timeout=0.3) as c, pytest.raises(BrokerUnavailable) as info:
        c.generate("base", prompt="x")
    assert isinstance(info.value, Timeout) and isinstance(info.value, ConnectionError)
    assert dead.addr in str(info.value)


def test_broker_lost_mid_stream_fails_after_connect_timeout() -> None:
    p = StandIn()
    with Client(p.addr, connect_timeout=0.5) as c:
        events = c.stream("vanish", prompt="x", max_new_tokens=4)
        assert next(events).token_id == 0
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="unreachable"):
            next(events)
        assert time.monotonic() - t0 < 3
    p.close()


def test_broker_restart_resumes_the_stream() -> None:
    first = StandIn()
    with Client(first.addr, timeout=10) as c:
        events = c.stream("vanish", prompt="Hello", max_new_tokens=4, seed=1)
        got = [next(events)]  # then the stand-in dies
        original = first.next_message(Generate)
        first.close()
        second = StandIn(endpoint=first.addr, vanish=False)  # the broker comes back
        try:
            got += list(events)
            resumed = second.next_message(Generate)
        finally:
            second.close()
    assert resumed.resume_ids == (100,)
    assert resumed.request_id != original.request_id
    assert (resumed.model, resumed.prompt, resumed.max_new_tokens) == ("vanish", "Hello", 4)
    assert [e.index for e in got] == [0, 1, 2, 3]
    assert [e.token_id for e in got] == [100, 101, 102, 103]
    assert "".join(e.text for e in got) == "Hello,"
    assert got[-1].finish_reason == "length"


@pytest.mark.parametrize("model", ["drain", "stopping"])
def test_a_stopping_broker_is_a_resume_not_an_answer(model: str) -> None:
    """19.4: ERROR(SHUTTING_DOWN) (a drain that timed out, or a GENERATE the stopping broker
    no longer admits) resumes on the next broker like a lost connection: complete output."""
    first = StandIn()
    with Client(first.addr, timeout=10) as c:
        events = c.stream(model, prompt="Hello", max_new_tokens=4, seed=1)
        got = [next(events)] if model == "drain" else []
        first.next_message(Generate)
        first.close()  # it stopped after its SHUTTING_DOWN
        second = StandIn(endpoint=first.addr, vanish=False)  # the upgraded broker
        try:
            got += list(events)
            resumed = second.next_message(Generate)
        finally:
            second.close()
    assert resumed.resume_ids == ((100,) if model == "drain" else ())
    assert [e.token_id for e in got] == [100, 101, 102, 103]
    assert [e.index for e in got] == [0, 1, 2, 3]
    assert got[-1].finish_reason == "length"


def test_wait_ready_until_covered(client: Client, peer: StandIn) -> None:
    uncovered = {"workers": [], "models": {"base": {"covered": False}}}
    peer.status_hook = lambda n: uncovered if n < 3 else None
    body = client.wait_ready(models=["base"], timeout=5)
    assert body["models"]["base"]["covered"] is True
    assert peer.status_requests == 3


def test_wait_ready_timeout_names_models(client: Client, peer: StandIn) -> None:
    peer.status_body = {"workers": [], "models": {"a": {"covered": True}, "b": {"covered": 0}}}
    with pytest.raises(Timeout, match=r"not covered.*: b$"):
        client.wait_ready(models=["a", "b"], timeout=0.5)


def test_wait_ready_unknown_model(client: Client) -> None:
    with pytest.raises(UnknownModel, match="zzz"):
        client.wait_ready(models=["base", "zzz"], timeout=5)


def test_status_body(client: Client) -> None:
    assert client.status() == plain(status(COVERED))  # the JSON shape: every field
    assert client.status()["models"]["base"]["route"] is None


def test_closed_client_raises(peer: StandIn) -> None:
    c = Client(peer.addr)
    c.close()
    c.close()  # idempotent
    with pytest.raises(ConnectionFailed, match="closed"):
        c.generate("base", prompt="x")


def test_close_fails_waiting_requests(peer: StandIn) -> None:
    c = Client(peer.addr)
    events = c.stream("silent", prompt="x")
    peer.next_message(Generate)
    threading.Timer(0.2, c.close).start()
    with pytest.raises(ConnectionFailed, match="closed"):
        next(events)


def test_finalizer_closes_socket(peer: StandIn) -> None:
    c = Client(peer.addr)
    thread = c._transport.thread
    del c
    thread.join(5)
    assert not thread.is_alive()


def test_bad_address() -> None:
    with pytest.raises(ConnectionFailed, match="cannot connect"):
        Client("nonsense://x")


def test_missing_keys(tmp_path: Path) -> None:
    with pytest.raises(ConnectionFailed, match=r"client\.key_secret"):
        Client("tcp://127.0.0.1:1", keys_dir=tmp_path)


def _keys(folder: Path) -> CurveKeys:
    """zmq.auth certificates as `blockllm keys gen` writes them; the broker's pair."""
    import zmq.auth

    folder.mkdir(exist_ok=True)
    zmq.auth.create_certificates(folder, "broker")
    zmq.auth.create_certificates(folder, "client")
    public, secret = zmq.auth.load_certificate(folder / "broker.key_secret")
    return CurveKeys(public=public, secret=secret)


def test_curve_keys(tmp_path: Path) -> None:
    server = _keys(tmp_path / "keys")
    p = StandIn(curve=server)
    try:
        with Client(p.addr, keys_dir=tmp_path / "keys", timeout=5) as c:
            assert c.generate("base", prompt="Hi", max_new_tokens=2).text == "Hello"
    finally:
        p.close()


@pytest.mark.parametrize("case", ["other-broker-key", "no-keys", "keys-to-plain-broker"])
def test_refused_handshake_fails_fast(tmp_path: Path, case: str) -> None:
    """A refused handshake is a clear BrokerUnavailable at once, not a wait for the timeout
    (zmq would retry it forever) nor a misleading 'send queue full'."""
    server = _keys(tmp_path / "keys")
    p = StandIn(curve=None if case == "keys-to-plain-broker" else server)
    keys = {"other-broker-key": tmp_path / "other", "no-keys": None}.get(case, tmp_path / "keys")
    if case == "other-broker-key":
        _keys(tmp_path / "other")  # a client that trusts another broker key
    try:
        t0 = time.monotonic()
        with Client(p.addr, keys_dir=keys, timeout=30) as c, pytest.raises(BrokerUnavailable):
            c.generate("base", prompt="Hi")
        assert time.monotonic() - t0 < 15, "a refused handshake must not wait out the timeout"
    finally:
        p.close()


def test_async_refused_handshake_fails_fast(tmp_path: Path) -> None:
    p = StandIn(curve=_keys(tmp_path / "keys"))

    async def main() -> None:
        async with AsyncClient(p.addr, timeout=30) as c:
            with pytest.raises(BrokerUnavailable, match=r"(?i)handshake"):
                await c.generate("base", prompt="Hi")

    try:
        t0 = time.monotonic()
        asyncio.run(main())
        assert time.monotonic() - t0 < 15
    finally:
        p.close()


# ---- asyncio client ------------------------------------------------------------------------


def test_async_generate_stream_gather(peer: StandIn) -> None:
    async def main() -> None:
        async with AsyncClient(peer.addr, timeout=10) as c:
            out = await c.generate("base", prompt="Hello", max_new_tokens=3, seed=1)
            assert out == Completion([100, 101, 102], "Hello,", "length", 5)
            text = [ev.text async for ev in c.stream("base", prompt="Hi", max_new_tokens=6)]
            assert "".join(text) == "".join(PIECES)
            outs = await asyncio.gather(
                *(c.generate("base", prompt="x", max_new_tokens=4, seed=s) for s in range(16))
            )
            for s, o in enumerate(outs):
                assert o.token_ids == [s * 100 + i for i in range(4)]
            assert (await c.status())["models"]["base"]["covered"]
            await c.wait_ready(models=["base"], timeout=5)

    asyncio.run(main())


def test_async_errors_and_timeout(peer: StandIn) -> None:
    async def main() -> None:
        async with AsyncClient(peer.addr) as c:
            with pytest.raises(UnknownModel):
                await c.generate("nope", prompt="x")
            with pytest.raises(Overloaded):
                await c.generate("err-OVERLOADED", prompt="x")
            with pytest.raises(BadRequest):
                c.stream("base")
            with pytest.raises(Timeout, match=re.escape(peer.addr)):
                await c.generate("silent", prompt="x", timeout=0.3)
        sent = peer.next_message(Generate)
        while sent.model != "silent":
            sent = peer.next_message(Generate)
        assert peer.next_message(Cancel).request_id == sent.request_id

    asyncio.run(main())


def test_async_stream_break_cancels(peer: StandIn) -> None:
    async def main() -> None:
        async with AsyncClient(peer.addr, timeout=10) as c:
            stream = c.stream("drip", prompt="x", max_new_tokens=6)
            async for _ev in stream:
                break
            await stream.aclose()
            assert not c.demux.pending

    asyncio.run(main())
    sent = peer.next_message(Generate)
    assert peer.next_message(Cancel).request_id == sent.request_id


def test_async_break_then_close_still_cancels(peer: StandIn) -> None:
    async def main() -> None:
        async with AsyncClient(peer.addr, timeout=10) as c:
            async for _ev in c.stream("drip", prompt="x"):
                break  # no aclose(): the generator is finalized while the client closes

    asyncio.run(main())
    sent = peer.next_message(Generate)
    assert peer.next_message(Cancel).request_id == sent.request_id
