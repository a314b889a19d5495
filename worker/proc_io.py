"""The worker process's IO thread: the only user of its DEALER socket to the broker.

Receives and validates messages (`frames.decode`), copies tensors out of the zmq frames, and
hands them to the compute loop through an inbox bounded by `input_queue_size` (a FORWARD beyond
it is answered QUEUE_FULL at once); encodes and sends whatever the compute loop queues
(zero-copy: the queued tensors stay referenced by zmq until sent). Keeps the broker liveness
(ping-pong, reconnect with capped exponential backoff). See worker/proc.py for the whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import zmq

from blockllm.broker import frames
from blockllm.broker.protocol import (
    Error,
    ErrorCode,
    Forward,
    Heartbeat,
    Kind,
    Message,
    ProtocolError,
)
from blockllm.broker.sockets import make_socket
from blockllm.worker.config import WorkerProcConfig

logger = logging.getLogger(__name__)


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
Outbound = tuple[Message, tuple[torch.Tensor, ...]]


class IOThread(threading.Thread):
    """Owns the DEALER to the broker. `send` and `stop` may be called from any thread."""

    def __init__(
        self,
        cfg: WorkerProcConfig,
        identity: bytes,
        inbox: queue.SimpleQueue[Inbound],
        facts: Callable[[], Heartbeat],
    ) -> None:
        super().__init__(name="worker-io", daemon=True)
        self.cfg = cfg
        self.identity = identity
        self.inbox = inbox
        self.facts = facts
        self.outbox: queue.SimpleQueue[Outbound] = queue.SimpleQueue()
        self.bad_messages = 0
        self.reconnects = 0
        self.dropped = 0
        self._pinged = False
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._curve = None
        if cfg.keys_dir:  # fail at start-up, not at the first reconnect
            from blockllm.broker.security import load_client_keys

            self._curve = load_client_keys(cfg.keys_dir)

    # -- any thread ------------------------------------------------------------------------
    def send(self, msg: Message, tensors: tuple[torch.Tensor, ...] = ()) -> None:
        """Queue a message for the broker (tensors are kept referenced until zmq sent them)."""
        self.outbox.put((msg, tensors))
        self._wake()

    def stop(self) -> None:
        """Flush what is queued, close the socket (with linger) and end the thread."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        # A full pipe already holds wake-ups: the thread will wake.
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
            if self._sock is not None:
                self._sock.close(linger=self.cfg.dead_linger_ms)
            os.close(self._wake_r)
            os.close(self._wake_w)

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
        while True:
            wake_at = min(beat + interval, heard + interval * cfg.liveness)
            events = dict(poller.poll(max(0.0, wake_at - time.monotonic()) * 1000 + 1))
            if self._wake_r in events:
                os.read(self._wake_r, 4096)
            if events.get(self._sock) and self._receive_all():
                heard = time.monotonic()
                backoff = interval
            self._flush()
            if self._stopping:
                return
            now = time.monotonic()
            if self._pinged or (now - beat >= interval and now - heard < interval):
                self._pinged = False
                self._send(frames.encode(self.facts()))
                beat = now
            if now - heard > interval * cfg.liveness:
                poller.unregister(self._sock)
                self._reconnect(backoff)
                poller.register(self._sock, zmq.POLLIN)
                heard = beat = time.monotonic()
                backoff = min(backoff * 2, cfg.reconnect_max_s)

    def _reconnect(self, backoff: float) -> None:
        """Broker silent: drop the socket (and what it queued), wait, connect afresh."""
        assert self._sock is not None
        logger.warning(
            "[dead] broker %s silent for %.1f s; reconnecting in %.1f s",
            self.cfg.broker,
            self.cfg.heartbeat_interval_s * self.cfg.liveness,
            backoff,
        )
        self._sock.close(linger=0)
        self._sock = None
        # A backoff, not a synchronisation: stop() still ends it at once through the pipe.
        zmq.select([self._wake_r], [], [], backoff)
        self._sock = self.connect()
        self.reconnects += 1
        self.inbox.put(Reset())

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
        try:
            msg, views = frames.decode(parts)
        except ProtocolError as e:
            self.bad_messages += 1
            logger.warning(
                "dropped a bad message from the broker (%d so far): %s", self.bad_messages, e
            )
            return
        if msg.KIND is Kind.HEARTBEAT:
            self._pinged = True  # answered with our load facts (the pong)
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
        # Copy out of the zmq frames now: a live view would pin the whole message.
        self.inbox.put((msg, [v.clone() for v in views]))

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
                msg, tensors = self.outbox.get_nowait()
            except queue.Empty:
                return
            self._send(frames.encode(msg, tensors))
