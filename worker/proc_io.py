"""The worker process's IO thread: the only user of its DEALER socket to the broker.

Receives and validates messages (`frames.decode`), copies tensors out of the zmq frames, and
hands them to the compute loop through an inbox bounded by `input_queue_size` (a FORWARD beyond
it is answered QUEUE_FULL at once); encodes and sends whatever the compute loop queues
(zero-copy: the queued tensors stay referenced by zmq until sent). Keeps the broker liveness
(ping-pong, reconnect with capped exponential backoff) once the worker has announced itself
with READY (before that the broker does not know it: no heartbeats, no reconnects).

Zoo fetches share the socket: `fetch` (called by the loader thread) sends a FETCH under a fresh
request id and waits for its answer; a BLOB or ERROR carrying a pending fetch's id goes to that
waiter, never to the compute inbox. See worker/proc.py for the whole.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import zmq

from blockllm.broker import frames
from blockllm.broker.protocol import (
    Error,
    ErrorCode,
    Fetch,
    Forward,
    Heartbeat,
    Kind,
    Message,
)
from blockllm.broker.ratelog import RateLimitedLog
from blockllm.broker.sockets import make_socket
from blockllm.broker.timings import Timings, clock
from blockllm.worker.config import WorkerProcConfig
from blockllm.worker.fetch import FetchError
from blockllm.worker.messages import is_decode
from blockllm.worker.transfer import host_copy, pinned_frames

logger = logging.getLogger(__name__)

HANDSHAKE_FAILED_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class IOThreadFailed(RuntimeError):
    """The IO thread died; the worker cannot talk to the broker any more."""


@dataclass(frozen=True, slots=True)
class Reset:
    """Inbox marker from the IO thread: reconnected, drop all KV and send READY again."""


@dataclass(frozen=True, slots=True)
class Wake:
    """Inbox marker: wake the compute loop (shutdown requested)."""


@dataclass(frozen=True, slots=True)
class Failed:
    """Inbox marker: the IO thread died with `error`."""

    error: BaseException


Inbound = tuple[Message, list[torch.Tensor]] | Reset | Wake | Failed
# (message, its tensors, when the compute loop queued it: a clock() for a decode RESULT, else
# 0, what to call before the tensors' bytes are read: worker/transfer.py's to_host, or None)
Outbound = tuple[Message, tuple[torch.Tensor, ...], float, Callable[[], None] | None]
# The answer to one FETCH (BLOB or ERROR and its tensor views), or None: connection lost.
FetchAnswer = tuple[Message, list[torch.Tensor]] | None
ARRIVED_MAX = 4096  # decode FORWARDs whose arrival time waits for the compute loop


class IOThread(threading.Thread):
    """Owns the DEALER to the broker. `send` and `stop` may be called from any thread."""

    def __init__(
        self,
        cfg: WorkerProcConfig,
        identity: bytes,
        inbox: queue.SimpleQueue[Any],  # Inbound items (and the compute loop's own)
        facts: Callable[[], Heartbeat],
    ) -> None:
        super().__init__(name="worker-io", daemon=True)
        self.cfg = cfg
        self.identity = identity
        self.inbox = inbox
        self.facts = facts
        self.outbox: queue.SimpleQueue[Outbound] = queue.SimpleQueue()
        # this thread's phases of decode items (deserialise, hand-off, serialise), and when each
        # decode FORWARD was ready for the compute loop (request id -> clock(); it pops them)
        self.timings = Timings()
        self.arrived: dict[str, float] = {}
        self.pinned = pinned_frames(cfg.device)  # frames in go to pinned memory (CUDA)
        self.bad_messages = 0
        self.reconnects = 0
        self._lost_at: float | None = None  # monotonic time the broker went silent (None: up)
        self._attempts = 0  # reconnect attempts since then
        self.dropped = 0
        self._pinged = False
        self._stopping = False
        self._registered = False  # a READY went out: the broker knows us, liveness applies
        self._fetches: dict[str, queue.SimpleQueue[FetchAnswer]] = {}  # request id -> waiter
        self._fetch_lock = threading.Lock()
        self._fetch_ids = itertools.count(1)
        self._bad_log = RateLimitedLog(logger)
        self.fetch_chunks = 0  # answers routed to fetchers
        self._wake_r, self._wake_w = os.pipe()
        self._pipe_lock = threading.Lock()
        self._pipe_open = True
        os.set_blocking(self._wake_w, False)
        self._ctx = zmq.Context()  # its own: `deliver` terminates it at the exit
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None  # the DEALER's failed handshakes
        self._handshake_logged: str | None = None
        self._curve = None
        if cfg.keys_dir:  # fail at start-up, not at the first reconnect
            from blockllm.broker.security import load_client_keys

            self._curve = load_client_keys(cfg.keys_dir, role="worker")

    # -- any thread ------------------------------------------------------------------------
    def send(
        self,
        msg: Message,
        tensors: tuple[torch.Tensor, ...] = (),
        ready: Callable[[], None] | None = None,
        *,
        timed: bool = False,
    ) -> None:
        """Queue a message for the broker (tensors are kept referenced until zmq sent them);
        `ready`: called (here, on the IO thread) before the tensors are encoded; `timed`: a
        decode item's RESULT, whose hand-off and serialisation are timed."""
        self.outbox.put((msg, tensors, clock() if timed else 0.0, ready))
        self._wake()

    def stop(self) -> None:
        """Flush what is queued, close the socket (with linger) and end the thread."""
        self._stopping = True
        self._wake()

    def deliver(self, timeout_s: float) -> bool:
        """Once the thread has ended: terminate the ZeroMQ context, so what its closed sockets
        still hold (the last RESULTs, DEAD) leaves within their linger before the process
        exits. A process exit does not wait for that (multiprocessing's children end in
        os._exit; DEAD and a RESULT were lost under load). Bounded by `timeout_s` (a socket left
        open elsewhere cannot hang the exit); whether it finished."""
        term = threading.Thread(target=self._ctx.term, name="worker-zmq-term", daemon=True)
        term.start()
        term.join(timeout_s)
        return not term.is_alive()

    def fetch(self, msg: Fetch) -> tuple[Message, list[torch.Tensor]]:
        """Send `msg` (a FETCH; its request id is replaced by a fresh one) and wait for the
        answer: a BLOB or ERROR, with tensor views of the received frame (drop them promptly).

        Any thread but the IO thread; one chunk in flight per caller. Raises FetchError when
        no answer comes within `fetch_timeout_s` or the connection is reset meanwhile."""
        rid = f"fetch-{next(self._fetch_ids)}"
        waiter: queue.SimpleQueue[FetchAnswer] = queue.SimpleQueue()
        with self._fetch_lock:
            self._fetches[rid] = waiter
        try:
            self.send(replace(msg, request_id=rid))
            answer = waiter.get(timeout=self.cfg.fetch_timeout_s)
        except queue.Empty:
            raise FetchError(
                f"broker did not answer FETCH {msg.what} {msg.name} @ {msg.offset} "
                f"within {self.cfg.fetch_timeout_s:.0f} s"
            ) from None
        finally:
            with self._fetch_lock:
                self._fetches.pop(rid, None)
        if answer is None:
            raise FetchError(f"connection to the broker lost during FETCH {msg.what} {msg.name}")
        return answer

    def _fail_fetches(self) -> None:
        """Wake every waiting fetcher with 'connection lost' (reconnect, thread end)."""
        with self._fetch_lock:
            waiters = list(self._fetches.values())
            self._fetches.clear()
        for waiter in waiters:
            waiter.put(None)

    def _wake(self) -> None:
        # Under the lock: the thread closes the pipe when it ends (stop() sets the flag first,
        # so it may end before the write), and a closed fd number may already be reused.
        with self._pipe_lock:
            if self._pipe_open:  # a full pipe already holds wake-ups: the thread will wake
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"\0")

    # -- the IO thread -----------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # the compute loop turns this into the fatal path
            logger.exception("[dead] worker IO thread failed")
            self.inbox.put(Failed(e))
        finally:
            self._fail_fetches()
            self._unwatch()
            if self._sock is not None:
                self._sock.close(linger=self.cfg.dead_linger_ms)
            with self._pipe_lock:
                self._pipe_open = False
                os.close(self._wake_r)
                os.close(self._wake_w)

    def send_last(self, msg: Message) -> None:
        """Send `msg` (a DEAD) on the way out: queued if the IO thread runs, else on a fresh
        socket just for it, closed with linger so it leaves before the process exits."""
        if self.is_alive():
            self.send(msg)
            return
        sock = self.connect()
        sock.send_multipart(frames.encode(msg), copy=False)
        sock.close(linger=self.cfg.dead_linger_ms)

    def connect(self) -> zmq.Socket:
        sock = make_socket(
            self._ctx,
            zmq.DEALER,
            self.cfg.broker,
            bind=False,
            identity=self.identity,
            linger_ms=self.cfg.dead_linger_ms,
            curve=self._curve,
        )
        return sock

    def _loop(self) -> None:
        """Ping-pong liveness, mirroring the broker (which pings a worker it has not heard
        from for a beat): answer every ping with our load facts; while the broker is talking
        to us anyway, also report the facts once a beat (so they stay fresh under load); a
        broker silent for `interval * liveness` is presumed gone -> reconnect."""
        cfg = self.cfg
        interval = cfg.heartbeat_interval_s
        self._sock = self.connect()
        heard = beat = time.monotonic()
        backoff = interval
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._watch(), zmq.POLLIN)
        while True:
            wake_at = min(beat + interval, heard + interval * cfg.liveness)
            events = dict(poller.poll(max(0.0, wake_at - time.monotonic()) * 1000 + 1))
            if self._wake_r in events:
                os.read(self._wake_r, 4096)
            if self._monitor is not None and events.get(self._monitor):
                self._on_handshake_failed()
            if events.get(self._sock) and self._receive_all():
                heard = time.monotonic()
                backoff = interval
                if self._lost_at is not None:  # the broker answered the new connection
                    logger.info(
                        "[ready] reconnected to broker %s after %.1f s (%d attempts)",
                        self.cfg.broker,
                        heard - self._lost_at,
                        self._attempts,
                    )
                    self._lost_at, self._attempts = None, 0
            self._flush()
            if self._stopping:
                return
            now = time.monotonic()
            if not self._registered:  # the broker does not know us yet: nothing to keep alive
                heard = beat = now
                continue
            if self._pinged or (now - beat >= interval and now - heard < interval):
                self._pinged = False
                self._send(frames.encode(self._heartbeat()))
                beat = now
            if now - heard > interval * cfg.liveness:
                poller.unregister(self._sock)
                poller.unregister(self._monitor)
                self._reconnect(backoff)
                poller.register(self._sock, zmq.POLLIN)
                poller.register(self._watch(), zmq.POLLIN)
                heard = beat = time.monotonic()
                backoff = min(backoff * 2, cfg.reconnect_max_s)

    def _heartbeat(self) -> Heartbeat:
        """The compute loop's latest facts, with this thread's timings added as of now."""
        facts = self.facts()
        mine = self.timings.snapshot()
        return replace(facts, timings={**facts.timings, **mine}) if mine else facts

    def _reconnect(self, backoff: float) -> None:
        """Broker silent: drop the socket (and what it queued), wait, connect afresh."""
        assert self._sock is not None
        logger.warning(
            "[dead] broker %s silent for %.1f s; reconnecting in %.1f s",
            self.cfg.broker,
            self.cfg.heartbeat_interval_s * self.cfg.liveness,
            backoff,
        )
        if self._lost_at is None:
            self._lost_at = time.monotonic()
        self._attempts += 1
        self._unwatch()
        self._sock.close(linger=0)
        self._sock = None
        # A backoff, not a synchronisation: stop() still ends it at once through the pipe.
        zmq.select([self._wake_r], [], [], backoff)
        self._sock = self.connect()
        self.reconnects += 1
        self._fail_fetches()  # their answers went with the old socket
        self.inbox.put(Reset())

    def _watch(self) -> zmq.Socket:
        """Follow the DEALER's failed handshakes (a key mismatch is otherwise mere silence)."""
        assert self._sock is not None
        self._monitor = self._sock.get_monitor_socket(HANDSHAKE_FAILED_EVENTS)
        return self._monitor

    def _unwatch(self) -> None:
        if self._monitor is not None and self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._monitor.close(linger=0)
        self._monitor = None

    def _on_handshake_failed(self) -> None:
        """Log why the broker refused us, once per reason (zmq retries every ~100 ms)."""
        from zmq.utils.monitor import recv_monitor_message

        from blockllm.broker.security import handshake_failure_reason

        assert self._monitor is not None
        while self._monitor.poll(0):
            reason = handshake_failure_reason(recv_monitor_message(self._monitor))
            if reason != self._handshake_logged:
                self._handshake_logged = reason
                logger.error(
                    "[auth] broker %s refused this worker's handshake: %s (check --keys)",
                    self.cfg.broker,
                    reason,
                )

    def _receive_all(self) -> bool:
        """Handle every message waiting on the socket; whether there was any."""
        assert self._sock is not None
        got = False
        while True:
            try:
                parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return got
            got = True
            self._dispatch(parts)

    def _dispatch(self, parts: list[zmq.Frame]) -> None:
        """One message from the broker; nothing a message does escapes (counted in
        `bad_messages`, logged rate-limited, dropped): the IO thread is the worker's life."""
        try:
            self._dispatch_one(parts)
        except Exception as e:
            self.bad_messages += 1
            self._bad_log.log(
                type(e).__name__,
                "dropped a bad message from the broker (%d so far): %s: %s",
                self.bad_messages,
                type(e).__name__,
                e,
            )

    def _dispatch_one(self, parts: list[zmq.Frame]) -> None:
        t0 = clock()
        msg, views = frames.decode(parts)
        if msg.KIND is Kind.HEARTBEAT:
            self._pinged = True  # answered with our load facts (the pong)
            return
        if msg.KIND in (Kind.BLOB, Kind.ERROR) and self._to_fetcher(msg, views):
            return
        if msg.KIND is Kind.FORWARD and self.inbox.qsize() >= self.cfg.input_queue_size:
            assert isinstance(msg, Forward)
            err = Error(
                msg.request_id,
                ErrorCode.QUEUE_FULL.value,
                "worker input queue full",
                retryable=True,
                step=msg.step,
            )
            self._send(frames.encode(err))
            return
        if msg.KIND is Kind.SPECULATE and self.inbox.qsize() >= self.cfg.input_queue_size:
            return  # a prediction is best effort: the real FORWARD follows
        # Copy out of the zmq frames now: a live view would pin the whole message.
        tensors = [host_copy(v, self.pinned) for v in views]
        if msg.KIND is Kind.FORWARD and len(tensors) == 1 and is_decode(msg, tensors[0]):
            t1 = clock()
            self.timings.add("deserialise", t1 - t0)
            if len(self.arrived) >= ARRIVED_MAX:  # never popped (a reset): start over
                self.arrived.clear()
            self.arrived[msg.request_id] = t1
        self.inbox.put((msg, tensors))

    def _to_fetcher(self, msg: Message, views: list[torch.Tensor]) -> bool:
        """Hand a BLOB/ERROR answering a pending fetch to its waiter; whether it was one.

        A BLOB nobody waits for (its fetch timed out) is dropped here too: the compute loop has
        no use for it."""
        rid = getattr(msg, "request_id", "")
        with self._fetch_lock:
            waiter = self._fetches.pop(rid, None)
        if waiter is not None:
            self.fetch_chunks += 1
            waiter.put((msg, views))  # views, no copy: the fetcher writes the chunk out at once
            return True
        if msg.KIND is Kind.BLOB:
            logger.debug("dropped a stale BLOB %s", rid)
            return True
        return False

    def _send(self, parts: list[frames.Buffer]) -> None:
        """Send without blocking: a broker that stopped reading must not wedge liveness."""
        assert self._sock is not None
        try:
            self._sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped += 1
            logger.warning(
                "broker not reading: dropped a %r message (%d so far)",
                bytes(parts[0]),
                self.dropped,
            )

    def _flush(self) -> None:
        assert self._sock is not None
        while True:
            try:
                msg, tensors, queued_at, ready = self.outbox.get_nowait()
            except queue.Empty:
                return
            if ready is not None:  # a download from the device still under way
                ready()
            t0 = clock()
            self._send(frames.encode(msg, tensors))
            if queued_at:
                self.timings.add("handoff", t0 - queued_at)
                self.timings.add("serialise", clock() - t0)
            if msg.KIND is Kind.READY:
                self._registered = True
