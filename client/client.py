"""The synchronous client: one DEALER socket, one IO thread, many concurrent requests.

    with Client("tcp://127.0.0.1:5555") as c:
        c.wait_ready(models=["base"], timeout=60)
        out = c.generate("base", prompt="Hello", max_new_tokens=32)
        for ev in c.stream("base", prompt="Hello"):
            ...

Threading: the socket belongs to one background IO thread (zmq sockets are used only by the
thread that created them). User threads hand encoded messages to it through a queue plus a
socketpair wake-up, and wait on a bounded per-request queue that the IO thread fills by
request_id (`Demux`). So one `Client` may be shared by any number of threads.

Broker loss: ZMTP heartbeats turn a silent broker into a dropped connection. A request whose
connection drops waits for the next one (zmq reconnects by itself) and is then resumed with
`Generate.resume_ids` = the tokens it already delivered; if no connection comes within
`connect_timeout`, it fails with `BrokerUnavailable` (a `Timeout`, naming the address).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from blockllm.broker import frames
from blockllm.broker.protocol import Cancel, Generate, StatusRequest, Token, plain
from blockllm.broker.sockets import CurveKeys
from blockllm.client.demux import (
    CONNECTION_LOST,
    MAX_STATUS_PAGES,
    MONITOR_EVENTS,
    Demux,
    ReadyPoll,
    Sink,
    connect_dealer,
    load_client_keys,
    merge_status,
    open_dealer,
    reply_error,
    send_refused,
    wait_budget,
)
from blockllm.client.errors import BlockLLMError, ConnectionFailed, Timeout
from blockllm.client.request import (
    Accumulator,
    Completion,
    GenerateParams,
    TokenEvent,
    build_generate,
    new_request_id,
    to_event,
)

logger = logging.getLogger(__name__)

CLOSE_LINGER_MS = 100  # bounded: lets the last CANCELs leave when a client closes


class _Transport:
    """Owns the IO thread and, inside it, the zmq context, DEALER and monitor sockets."""

    def __init__(self, addr: str, curve: CurveKeys | None) -> None:
        self.demux = Demux(addr)
        self.demux.keyed = curve is not None
        self._curve = curve
        self._cmds: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._lock = threading.Lock()
        self._stopped = False
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="blockllm-client-io", daemon=True)
        self.thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._wake_r.close()
            self._wake_w.close()
            raise self._start_error

    # ---- user threads --------------------------------------------------------------------
    def post(self, op: str, a: Any = None, b: Any = None) -> None:
        """Queue a command for the IO thread; raises ConnectionFailed once closed."""
        with self._lock:  # after the IO thread's final drain nothing may be queued
            if self._stopped:
                raise ConnectionFailed(f"client for {self.demux.addr} is closed")
            self._cmds.put((op, a, b))
        # A full pipe already holds a pending wake-up; a closed one means we are closing.
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    # ---- IO thread -----------------------------------------------------------------------
    def _run(self) -> None:
        ctx = zmq.Context()
        try:
            sock = open_dealer(ctx, self.demux.addr, self._curve)
            monitor = sock.get_monitor_socket(MONITOR_EVENTS)
            connect_dealer(sock, self.demux.addr)
        except BaseException as e:
            ctx.destroy(linger=0)
            self._start_error = e if isinstance(e, BlockLLMError) else ConnectionFailed(str(e))
            with self._lock:
                self._stopped = True
            self._started.set()
            return
        self._started.set()
        error: BlockLLMError | None = None
        try:
            self._loop(sock, monitor)
        except Exception as e:
            logger.exception("[dead] client IO thread for %s failed", self.demux.addr)
            error = ConnectionFailed(f"client IO thread failed: {e!r}")
        self._teardown(ctx, sock, monitor, error)

    def _loop(self, sock: zmq.Socket, monitor: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if monitor in ready:
                self._on_monitor(monitor, sock)
            if sock in ready:
                for _ in range(256):  # bounded burst so commands are not starved
                    try:
                        self.demux.on_frames(sock.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
            if self._wake_r.fileno() in ready and not self._on_wake(sock):
                return

    def _on_wake(self, sock: zmq.Socket) -> bool:
        """Run queued commands; False when asked to stop."""
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        handlers = {"send": self._send_request, "cancel": self._cancel, "forget": self._forget}
        while True:
            try:
                op, a, b = self._cmds.get_nowait()
            except queue.Empty:
                return True
            if op == "stop":
                return False
            handlers[op](sock, a, b)

    def _cancel(self, sock: zmq.Socket, key: str, _: Any) -> None:
        wire_id = self.demux.remove(key)
        if wire_id is not None:  # still running at the broker
            self._send(sock, Cancel(wire_id))

    def _forget(self, _sock: zmq.Socket, key: str, _: Any) -> None:
        self.demux.remove(key)

    def _send_request(self, sock: zmq.Socket, msg: Generate | StatusRequest, sink: Sink) -> None:
        self.demux.add(msg, sink)
        if not self._send(sock, msg):
            self.demux.remove(msg.request_id)
            sink(send_refused(self.demux))

    def _send(self, sock: zmq.Socket, msg: Any) -> bool:
        try:
            sock.send_multipart(frames.encode(msg), zmq.NOBLOCK, copy=False)
        except zmq.Again:  # HWM reached: the broker is not reading
            return False
        return True

    def _on_monitor(self, monitor: zmq.Socket, sock: zmq.Socket) -> None:
        while monitor.poll(0):
            info = recv_monitor_message(monitor)
            event = info["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                for msg in self.demux.on_connected():
                    self._send(sock, msg)
            elif event == zmq.EVENT_DISCONNECTED:
                for rid in self.demux.on_disconnected():
                    self._send(sock, Cancel(rid))  # queued: the GENERATE may not have left
            else:
                self.demux.on_handshake_failed(info)

    def _teardown(
        self,
        ctx: zmq.Context,
        sock: zmq.Socket,
        monitor: zmq.Socket,
        error: BlockLLMError | None,
    ) -> None:
        with self._lock:
            self._stopped = True
        addr = self.demux.addr

        def closed() -> BlockLLMError:
            return error or ConnectionFailed(f"client for {addr} was closed")

        while True:  # commands queued before the stop: fail their requests
            try:
                op, _a, b = self._cmds.get_nowait()
            except queue.Empty:
                break
            if op == "send":
                b(closed())
        rids = self.demux.fail_all(closed)
        with contextlib.suppress(zmq.ZMQError):
            for rid in rids if error is None else ():
                self._send(sock, Cancel(rid))
            # Not 0: the CANCELs just sent (here, or by a stream closed right before) must leave.
            sock.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close()
        ctx.term()
        self._wake_r.close()
        logger.debug("[shutdown] client for %s closed", addr)


def _close_transport(t: _Transport, timeout: float = 5.0) -> None:
    """Stop the IO thread and close its sockets (module-level: used by weakref.finalize)."""
    with contextlib.suppress(ConnectionFailed):  # already stopped
        t.post("stop")
    if threading.current_thread() is not t.thread:
        t.thread.join(timeout)
        if t.thread.is_alive():
            logger.warning("[shutdown] client IO thread did not stop within %.1f s", timeout)
    t._wake_w.close()


class Client:
    """A BlockLLM client; thread-safe: share one among threads.

    `timeout` is the default per-request deadline in seconds (None: none; a request still fails
    with BrokerUnavailable once no broker has been connected for `connect_timeout` seconds while
    it waits; a dropped connection is resumed on the next one). `keys_dir` enables CurveZMQ
    (`DIR/client.key_secret` + `DIR/broker.key`). Raises ConnectionFailed for a bad address or
    keys.
    """

    def __init__(
        self,
        addr: str,
        *,
        timeout: float | None = None,
        keys_dir: str | os.PathLike[str] | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.addr = addr
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        curve = load_client_keys(keys_dir) if keys_dir is not None else None
        self._transport = _Transport(addr, curve)
        self._finalizer = weakref.finalize(self, _close_transport, self._transport)

    def close(self) -> None:
        """Fail in-flight requests (ConnectionFailed), cancel them, close the socket."""
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.addr!r})"

    # ---- requests ------------------------------------------------------------------------
    def _submit(self, msg: Generate | StatusRequest, maxsize: int) -> queue.Queue[Any]:
        q: queue.Queue[Any] = queue.Queue(maxsize)
        self._transport.post("send", msg, q.put_nowait)
        return q

    def _next(self, q: queue.Queue[Any], t0: float, timeout: float | None, grace: bool) -> Any:
        """The next reply item; Timeout past the deadline, BrokerUnavailable when the broker has
        been unreachable for connect_timeout since this request began (if `grace`)."""
        demux = self._transport.demux
        while True:
            left = wait_budget(demux, t0, timeout, grace, self.connect_timeout)
            try:
                item = q.get(timeout=left)
            except queue.Empty:
                continue
            if item is not CONNECTION_LOST:
                return item

    def status(
        self, timeout: float | None = 10.0, *, model: str = "", worker: str = ""
    ) -> dict[str, Any]:
        """The broker's STATUS body (`{"workers": [...], "models": {...}, ...}`); `model` /
        `worker` keep only that model (and the workers serving it) / that worker (and its
        models). A large cluster's lists come in pages (STATUS_PAGE entries each): fetched
        one after the other and merged; `timeout` is per page."""
        body: dict[str, Any] = {}
        offset = 0
        for _ in range(MAX_STATUS_PAGES):
            page = self._status_page(timeout, model, worker, offset)
            body = body or page
            offset = merge_status(body, page)
            if not offset:
                break
        body.pop("page", None)  # the pages are merged: the whole lists
        return body

    def _status_page(
        self, timeout: float | None, model: str, worker: str, offset: int
    ) -> dict[str, Any]:
        """One STATUS answer: entries [offset, offset + the broker's page) of each list."""
        msg = StatusRequest(new_request_id(), model, worker, offset)
        q = self._submit(msg, 2)
        try:
            item = self._next(q, time.monotonic(), timeout, grace=timeout is None)
        except BlockLLMError:
            self._transport.post("forget", msg.request_id)
            raise
        err = reply_error(item)
        if err is not None:
            raise err
        return plain(item.body)  # the JSON-shaped body (protocol bodies.py)

    def wait_ready(
        self, models: Sequence[str] | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Poll STATUS until every named model (all known ones if None) is covered by a route.

        Returns the last status body. Raises UnknownModel for a model the broker does not know,
        Timeout naming the models still not covered (or the unreachable broker)."""
        poll = ReadyPoll(self.addr, models, timeout)
        while True:
            if poll.left() > 0:
                try:
                    if poll.covered(self.status(timeout=poll.left())):
                        return poll.body
                except Timeout as e:
                    poll.unanswered(e)
            time.sleep(poll.pause())

    def stream(
        self,
        model: str,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        *,
        params: GenerateParams | None = None,
        **fields: Any,
    ) -> Iterator[TokenEvent]:
        """Send the request now; iterate its TokenEvents. Breaking off (or closing) cancels it.

        `params` (GenerateParams) and keyword `fields` of it (max_new_tokens=32,
        temperature=0.0, top_k=0, top_p=1.0, seed=0, timeout=None: this client's default)
        set sampling and limits. Raises BadRequest (before sending) for bad arguments, and
        while iterating the typed error of a failure: UnknownModel, BadRequest, Overloaded,
        RequestFailed, Timeout, BrokerUnavailable."""
        return _as_events(self._start(model, prompt, input_ids, GenerateParams.of(params, fields)))

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        *,
        params: GenerateParams | None = None,
        **fields: Any,
    ) -> Completion:
        """Generate to the end and return the Completion; arguments and errors as `stream`."""
        acc = Accumulator()
        for tok in self._start(model, prompt, input_ids, GenerateParams.of(params, fields)):
            acc.add(tok)
        return acc.completion()

    def _start(
        self,
        model: str,
        prompt: str | None,
        input_ids: Sequence[int] | None,
        params: GenerateParams,
    ) -> Iterator[Token]:
        if params.timeout is None:
            params = replace(params, timeout=self.timeout)
        msg = build_generate(model, prompt, input_ids, params)
        q = self._submit(msg, msg.max_new_tokens + 2)
        return self._tokens(msg.request_id, q, time.monotonic(), params.timeout)

    def _tokens(
        self, request_id: str, q: queue.Queue[Any], t0: float, timeout: float | None
    ) -> Iterator[Token]:
        finished = False
        try:
            while not finished:
                item = self._next(q, t0, timeout, grace=True)
                err = reply_error(item)
                if err is not None:
                    finished = True
                    raise err
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:  # timeout, or the caller stopped early: free the broker's work
                with contextlib.suppress(ConnectionFailed):
                    self._transport.post("cancel", request_id)


def _as_events(tokens: Iterator[Token]) -> Iterator[TokenEvent]:
    with contextlib.closing(tokens):  # closing the events closes (cancels) the request too
        for t in tokens:
            yield to_event(t)


__all__ = ["Client", "Completion", "TokenEvent"]
