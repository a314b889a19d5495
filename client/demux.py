"""Pieces shared by the sync and asyncio clients: the pure reply demultiplexer (`Demux`, no
sockets), the wait budget of a request, `wait_ready`'s poll, key loading and the DEALER socket
set-up. Requests and their results are built in `request.py`."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import zmq

from blockllm.broker import frames
from blockllm.broker.protocol import (
    Blob,
    Error,
    ErrorCode,
    Fetch,
    Generate,
    ProtocolError,
    Status,
    StatusRequest,
    Token,
)
from blockllm.broker.sockets import CurveKeys, make_socket
from blockllm.client.errors import (
    BlockLLMError,
    BrokerUnavailable,
    ConnectionFailed,
    Overloaded,
    Timeout,
    UnknownModel,
    error_from,
)
from blockllm.client.request import new_request_id

logger = logging.getLogger(__name__)

HEARTBEAT_IVL_MS = 1000  # ZMTP ping; a broker host that vanishes is noticed after the timeout
HEARTBEAT_TIMEOUT_MS = 5000
# What the IO side watches: a finished handshake is "connected" (also under CurveZMQ).
MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def load_client_keys(keys_dir: str | os.PathLike[str]) -> CurveKeys:
    """CurveZMQ keys for a client (`blockllm keys gen` layout, read by broker.security);
    raises ConnectionFailed naming what is missing or corrupt."""
    from blockllm.broker.security import KeysError
    from blockllm.broker.security import load_client_keys as load

    try:
        return load(keys_dir)
    except KeysError as e:
        raise ConnectionFailed(f"--keys {keys_dir}: {e}") from None


def open_dealer(ctx: zmq.Context, addr: str, curve: CurveKeys | None) -> zmq.Socket:
    """The client's DEALER (random identity, linger 0, ZMTP heartbeats), not yet connected:
    attach a monitor, then `connect_dealer`. Raises ConnectionFailed.

    Connection options only apply to connects made after they are set, and make_socket connects
    at once: so it is given a never-bound inproc endpoint, dropped again before the real connect.
    """
    identity = f"client-{uuid.uuid4().hex[:16]}".encode()
    placeholder = f"inproc://blockllm-client-{uuid.uuid4().hex}"
    try:
        sock = make_socket(
            ctx, zmq.DEALER, placeholder, bind=False, identity=identity, linger_ms=0, curve=curve
        )
    except zmq.ZMQError as e:
        raise ConnectionFailed(f"cannot create a socket for {addr}: {e}") from None
    sock.disconnect(placeholder)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    return sock


def connect_dealer(sock: zmq.Socket, addr: str) -> None:
    try:
        sock.connect(addr)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        raise ConnectionFailed(f"cannot connect to broker at {addr!r}: {e}") from None


class _ConnectionLost:
    """Queued to a waiting request when its connection drops (not a reply: wait on)."""

    def __repr__(self) -> str:
        return "CONNECTION_LOST"


CONNECTION_LOST = _ConnectionLost()
Sink = Callable[[Any], None]  # non-blocking put of Token | Error | Status | BlockLLMError


@dataclass(slots=True)
class _Pending:
    sink: Sink
    msg: Generate | StatusRequest | Fetch  # as last sent: its request_id is the id on the wire now
    epoch: int | None  # the connection it went out on; None: not connected when sent
    lost: bool = False  # its connection dropped: re-send (resume) on the next one
    received: list[int] = field(default_factory=list)  # token ids delivered so far


@dataclass
class Demux:
    """Pure routing of broker replies to per-request sinks, and the connection's state.

    A request is keyed by the id the caller got (its first wire id). When the connection drops,
    its requests are kept and, on the next connection, sent again under a fresh wire id with
    `resume_ids` = the tokens already delivered (the broker continues from there; the old id is
    cancelled, so a broker that survived a network blip does not stream twice). Token indices
    are counted here, so they stay 0, 1, 2, ... across a resume.

    No sockets: the sync IO thread and the asyncio tasks drive it. Not thread-safe: only the
    owning IO thread / event loop calls its methods (other threads only read the state)."""

    addr: str
    pending: dict[str, _Pending] = field(default_factory=dict)
    wire: dict[str, str] = field(default_factory=dict)  # wire request_id -> key
    epoch: int = 0
    connected: bool = False
    disconnected_since: float = field(default_factory=time.monotonic)
    handshake_error: str | None = None
    keyed: bool = False  # this client presents CurveZMQ keys (for the refusal's hint)
    dropped: int = 0
    resumed: int = 0

    def add(self, msg: Generate | StatusRequest | Fetch, sink: Sink) -> None:
        epoch = self.epoch if self.connected else None
        self.pending[msg.request_id] = _Pending(sink, msg, epoch)
        self.wire[msg.request_id] = msg.request_id

    def remove(self, key: str) -> str | None:
        """Forget a request; its current wire id (to CANCEL), None if it was not pending."""
        p = self.pending.pop(key, None)
        if p is None:
            return None
        self.wire.pop(p.msg.request_id, None)
        return p.msg.request_id

    def on_frames(self, raw: Sequence[Any]) -> None:
        """Deliver one received message; undecodable or unexpected ones are counted, dropped."""
        try:
            msg = frames.decode_header(raw)
        except ProtocolError as e:
            self.dropped += 1
            logger.warning("[drop] undecodable message from broker %s: %s", self.addr, e)
            return
        if isinstance(msg, Token):
            self._deliver(msg.request_id, msg, terminal=msg.finish_reason is not None)
        elif isinstance(msg, Blob):  # a chunk of a zoo object (AsyncClient.fetch)
            self._deliver(
                msg.request_id, (msg, bytes(raw[2]) if len(raw) == 3 else b""), terminal=True
            )
        elif isinstance(msg, (Error, Status)):
            if isinstance(msg, Error) and not msg.request_id:
                logger.warning("[error] broker %s: %s %s", self.addr, msg.code, msg.message)
                return
            self._deliver(msg.request_id, msg, terminal=True)
        else:
            self.dropped += 1
            logger.debug("[drop] unexpected %s from broker", type(msg).__name__)

    def _deliver(self, wire_id: str, item: Any, *, terminal: bool) -> None:
        key = self.wire.get(wire_id)
        if key is None:  # finished, cancelled, timed out or resumed already: a late reply
            self.dropped += 1
            logger.debug("[drop] reply for unknown request %s", wire_id)
            return
        p = self.pending[key]
        if isinstance(item, Error) and item.code == ErrorCode.SHUTTING_DOWN.value:
            # the broker is stopping: resume on the next one, as after a lost connection (the
            # caller's timeout still bounds the wait)
            p.lost = True
            logger.info("[resume] broker %s shutting down: request %s waits", self.addr, key)
            return
        if terminal:
            self.remove(key)
        if isinstance(item, Token):
            item = replace(item, request_id=key, index=len(p.received))
            p.received.append(item.token_id)
        self.put(p, item)

    def put(self, p: _Pending, item: Any) -> None:
        try:
            p.sink(item)
        except (queue.Full, asyncio.QueueFull):
            # The queue holds max_new_tokens + 2 items: only a misbehaving peer overflows it.
            self.dropped += 1
            logger.warning("[drop] reply queue full for request %s", p.msg.request_id)

    def on_connected(self) -> list[Generate | StatusRequest | Fetch]:
        """A new connection: the messages to send again on it (requests lost with the last)."""
        self.epoch += 1
        self.connected = True
        self.handshake_error = None
        resend: list[Generate | StatusRequest | Fetch] = []
        for key, p in self.pending.items():
            if p.lost:
                self.wire.pop(p.msg.request_id, None)
                p.msg = _resumed(p.msg, p.received)
                self.wire[p.msg.request_id] = key
                resend.append(p.msg)
                p.lost = False
                p.epoch = self.epoch
            elif p.epoch is None:  # queued in the socket before this connection: sent on it
                p.epoch = self.epoch
        self.resumed += len(resend)
        logger.info("[connect] broker %s (connection %d)", self.addr, self.epoch)
        if resend:
            logger.info("[resume] %d requests re-sent to broker %s", len(resend), self.addr)
        return resend

    def on_disconnected(self) -> list[str]:
        """Mark the requests of the lost connection for a resume; their wire ids (to CANCEL)."""
        if not self.connected:
            return []
        self.connected = False
        self.disconnected_since = time.monotonic()
        lost = [p for p in self.pending.values() if p.epoch == self.epoch]
        for p in lost:
            p.lost = True
            self.put(p, CONNECTION_LOST)  # wakes a waiter so it starts counting connect_timeout
        logger.warning("[disconnect] broker %s: %d requests wait to resume", self.addr, len(lost))
        return [p.msg.request_id for p in lost]

    def on_handshake_failed(self, event: dict[str, Any]) -> None:
        """A failed handshake (a socket monitor's event dict), in words with what to do. zmq
        retries by itself: warn once per kind of failure, not at every retry."""
        why = handshake_hint(event, self.keyed)
        msg = f"handshake with the broker at {self.addr} failed: {why}"
        if msg != self.handshake_error:
            logger.warning("[connect] %s", msg)
        self.handshake_error = msg

    def fail_all(self, make_error: Callable[[], BlockLLMError]) -> list[str]:
        """Fail every pending request; their wire ids (to CANCEL)."""
        wire_ids = []
        for key in list(self.pending):
            p = self.pending[key]
            wire_ids.append(self.remove(key) or key)
            self.put(p, make_error())
        return wire_ids


def handshake_hint(event: dict[str, Any], keyed: bool) -> str:
    """Why a client's handshake failed and what to do: a keyless client of a keyed broker is
    told to pass keys, a keyed client of a keyless broker to drop them; the rest as the broker
    words them (`security.handshake_failure_reason`)."""
    from blockllm.broker.security import handshake_failure_reason

    if not keyed:  # a plain handshake fails only on a keyed server (the event may be NO_DETAIL)
        return (
            "the broker requires CurveZMQ keys and this client has none: pass --keys DIR "
            "or set BLOCKLLM_KEYS (Python: keys_dir=DIR), DIR holding an admitted client key"
        )
    if event.get("value") == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return "the broker runs without CurveZMQ keys: drop --keys / BLOCKLLM_KEYS"
    return handshake_failure_reason(event)


def _resumed(
    msg: Generate | StatusRequest | Fetch, received: list[int]
) -> Generate | StatusRequest | Fetch:
    if isinstance(msg, Generate):
        return replace(msg, request_id=new_request_id(), resume_ids=tuple(received))
    return replace(msg, request_id=new_request_id())


def reply_error(item: Any) -> BlockLLMError | None:
    """The exception a queued item stands for, or None for a Token / Status."""
    if isinstance(item, Error):
        return error_from(item.code, item.message, item.retryable)
    if isinstance(item, BlockLLMError):
        return item
    return None


def no_reply(demux: Demux, waited: float) -> Timeout:
    """The Timeout for a request with no (final) reply; says whether we ever connected."""
    if demux.connected:
        why = "connected, but the broker did not answer in time"
    else:
        why = demux.handshake_error or "not connected: is the broker running at that address?"
    return Timeout(f"no reply from the broker at {demux.addr} within {waited:.1f} s ({why})")


def send_refused(demux: Demux) -> BlockLLMError:
    """The error for a GENERATE/STATUS the socket would not take (its HWM is reached)."""
    if demux.handshake_error and not demux.connected:
        return BrokerUnavailable(demux.handshake_error)
    return Overloaded(f"send queue to the broker at {demux.addr} is full")


def unreachable(demux: Demux, waited: float) -> BrokerUnavailable:
    why = demux.handshake_error or "is the broker running at that address?"
    return BrokerUnavailable(f"broker at {demux.addr} unreachable for {waited:.1f} s ({why})")


def wait_budget(
    demux: Demux, t0: float, timeout: float | None, grace: bool, connect_timeout: float
) -> float | None:
    """How long the wait for a request's next reply may block now (None: no limit).

    Raises BrokerUnavailable at once while the broker refuses our handshake (wrong or missing
    keys: zmq would retry forever), Timeout once `timeout` has passed since `t0`, and (if
    `grace`) BrokerUnavailable once no broker has been connected for `connect_timeout` since
    the request began; while disconnected the wait is cut to 0.1 s slices so that is noticed."""
    if demux.handshake_error and not demux.connected:  # refused, not late: say so now
        raise BrokerUnavailable(demux.handshake_error)
    now = time.monotonic()
    left = None if timeout is None else t0 + timeout - now
    if left is not None and left <= 0:
        raise no_reply(demux, timeout or 0.0)
    if not demux.connected:
        since = max(t0, demux.disconnected_since)
        if grace and now - since > connect_timeout:
            raise unreachable(demux, now - since)
        left = 0.1 if left is None else min(left, 0.1)
    return left


MAX_STATUS_PAGES = 1000  # a broker that keeps answering "next" cannot keep a client paging


def merge_status(first: dict[str, Any], page: dict[str, Any]) -> int:
    """Add a STATUS page's workers and models to `first` (the first page's body, whose other
    fields stand); the next page's offset, 0 after the last page (or an older broker's whole
    answer, which has no "page")."""
    if page is not first:
        first["workers"] = [*first.get("workers", ()), *page.get("workers", ())]
        first["models"] = {**first.get("models", {}), **page.get("models", {})}
    nxt = page.get("page", {}).get("next", 0) if isinstance(page.get("page"), dict) else 0
    return nxt if isinstance(nxt, int) and nxt > 0 else 0


class ReadyPoll:
    """`wait_ready`'s state, shared by both clients: ask STATUS until the models are covered.

    poll = ReadyPoll(addr, models, timeout)
    while True:
        if poll.left() > 0:
            try:
                if poll.covered(status(timeout=poll.left())):
                    return poll.body
            except Timeout as e:
                poll.unanswered(e)
        sleep(poll.pause())
    """

    def __init__(self, addr: str, models: Sequence[str] | None, timeout: float) -> None:
        self.addr, self.models, self.timeout = addr, models, timeout
        self.t0 = time.monotonic()
        self.waiting: list[str] | None = None  # None until the broker has answered once
        self.body: dict[str, Any] = {}

    def left(self) -> float:
        return self.t0 + self.timeout - time.monotonic()

    def covered(self, body: dict[str, Any]) -> bool:
        """Record an answer; True when every model is covered (UnknownModel if one is unknown)."""
        self.body = body
        self.waiting = require_covered(body, self.models)
        return not self.waiting

    def unanswered(self, e: Timeout) -> None:
        """A STATUS timed out: fatal only if the broker never answered at all."""
        if self.waiting is None:
            raise e

    def pause(self) -> float:
        """How long to sleep before asking again; the not-ready Timeout when time is up."""
        left = self.left()
        if left <= 0:
            if self.waiting is None:
                raise Timeout(f"broker at {self.addr} did not answer within {self.timeout:.1f} s")
            waiting = ", ".join(self.waiting)
            raise Timeout(f"models not covered by workers after {self.timeout:.1f} s: {waiting}")
        return min(0.2, left)


def require_covered(status: dict[str, Any], models: Sequence[str] | None) -> list[str]:
    """Names among `models` (all known if None) not yet covered; UnknownModel if unknown."""
    known = status.get("models")
    known = known if isinstance(known, dict) else {}
    names = list(known) if models is None else list(models)
    missing = [m for m in names if m not in known]
    if missing:
        raise UnknownModel(f"unknown model(s): {', '.join(missing)} (known: {sorted(known)})")
    return [m for m in names if not (isinstance(known[m], dict) and known[m].get("covered"))]


__all__ = ["Demux", "ReadyPoll", "wait_budget"]
