"""A stand-in broker for the client's unit tests: a real ROUTER socket on tcp://127.0.0.1:0 in a
thread, speaking the real protocol (broker.frames / broker.protocol).

It answers GENERATE for model "base" with a few TOKENs (token ids derived from the seed, so
concurrent requests can be told apart), ERROR(code) for model "err-<CODE>",
ERROR(UNKNOWN_MODEL) for any other name, nothing for model "silent", and STATUS_REQUEST with
its `status_body`. Model "drain" gets one token, then ERROR(SHUTTING_DOWN) and the stand-in
closes its socket (a broker whose drain timed out); "stopping" gets the ERROR at once (a broker
no longer admitting). Model "vanish" gets one token, then the
stand-in closes its socket (a
crashed broker). Every wait is bounded; nothing sleeps. Tests get it as the `peer` fixture
(tests/unit/conftest.py).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from blockllm.broker import frames
from blockllm.broker.protocol import (
    Error,
    ErrorCode,
    Generate,
    Status,
    StatusRequest,
    Token,
)
from blockllm.broker.sockets import CurveKeys, bound_endpoint, make_socket
from tests.unit.typed_bodies import status

pytestmark = pytest.mark.timeout(20)

PIECES = ["He", "llo", ",", "", " wörld", "!"]  # "" = a multi-byte character still pending
COVERED = {"workers": [], "models": {"base": {"covered": True, "routes": []}}}


class StandIn:
    """A ROUTER peer in a thread that answers like the broker does (see the module doc)."""

    def __init__(
        self,
        status_body: dict[str, Any] | None = None,
        endpoint: str = "",
        vanish: bool = True,
        curve: CurveKeys | None = None,
    ) -> None:
        self.vanish = vanish
        self.status_body = status_body if status_body is not None else COVERED
        self.status_hook: Any = None  # called with the request count, may return a body
        self.received: queue.Queue[Any] = queue.Queue()
        self.status_requests = 0
        self._ctx = zmq.Context()
        ep = endpoint or "tcp://127.0.0.1:0"
        self._sock = make_socket(self._ctx, zmq.ROUTER, ep, bind=True, curve=curve)
        self.addr = bound_endpoint(self._sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(20):
                continue
            ident, *raw = self._sock.recv_multipart()
            msg, _ = frames.decode(raw)
            self.received.put(msg)
            if self._answer(ident, msg) == "vanish":
                break
        self._sock.close(linger=0)
        self._ctx.term()

    def _send(self, ident: bytes, msg: Any) -> None:
        self._sock.send_multipart([ident, *frames.encode(msg)])

    def _answer(self, ident: bytes, msg: Any) -> str | None:
        if isinstance(msg, StatusRequest):
            self.status_requests += 1
            body = self.status_hook(self.status_requests) if self.status_hook else None
            self._send(ident, Status(msg.request_id, status(body or self.status_body)))
        elif isinstance(msg, Generate):
            return self._generate(ident, msg)
        return None

    def _generate(self, ident: bytes, g: Generate) -> str | None:
        rid = g.request_id
        if g.model == "silent":
            return None
        if g.model.startswith("err-"):
            code = g.model.removeprefix("err-")
            self._send(ident, Error(rid, code, f"stand-in {code}", code == "WORKER_LOST"))
            return None
        if g.model == "drip":  # two tokens, then nothing more (a stalled generation)
            for i in range(2):
                self._send(ident, Token(rid, i, i, PIECES[i]))
            return None
        if g.model in ("drain", "stopping") and self.vanish:  # a broker that is stopping
            if g.model == "drain":
                self._send(ident, Token(rid, 0, g.seed * 100, PIECES[0]))
            text = "broker shut down"
            self._send(ident, Error(rid, ErrorCode.SHUTTING_DOWN.value, text, True))
            return "vanish"
        if g.model not in ("base", "vanish", "drain", "stopping"):
            self._send(ident, Error(rid, ErrorCode.UNKNOWN_MODEL.value, f"no model {g.model!r}"))
            return None
        n_prompt = len(g.input_ids) if g.input_ids is not None else len(g.prompt or "")
        n = min(g.max_new_tokens, len(PIECES))
        for i in range(len(g.resume_ids), n):
            last = i == n - 1
            reason = ("length" if n == g.max_new_tokens else "stop") if last else None
            self._send(ident, Token(rid, i, g.seed * 100 + i, PIECES[i], reason, n_prompt))
            if g.model == "vanish" and self.vanish:
                return "vanish"
        return None

    def next_message(self, kind: type, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.received.get(timeout=max(0.0, deadline - time.monotonic()))
            if isinstance(msg, kind):
                return msg

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def peer() -> Iterator[StandIn]:
    p = StandIn()
    yield p
    p.close()
