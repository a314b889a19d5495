"""The asyncio client: one DEALER (zmq.asyncio), one reader task, many concurrent coroutines.

    async with AsyncClient("tcp://127.0.0.1:5555") as c:
        await c.wait_ready(models=["base"], timeout=60)
        out = await c.generate("base", prompt="Hello", max_new_tokens=32)
        async for ev in c.stream("base", prompt="Hello"):
            ...

All of it runs on one event loop (the one that first uses the client): a reader task delivers
replies by request_id into bounded per-request asyncio queues (`Demux`, shared with the sync
client), and a watcher task follows the connection (requests of a dropped connection are
resumed on the next one, or fail with BrokerUnavailable after `connect_timeout`). Not
thread-safe: use it from its event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from blockllm.broker import frames
from blockllm.broker.protocol import Blob, Cancel, Fetch, Generate, StatusRequest, Token, plain
from blockllm.client.demux import (
    CONNECTION_LOST,
    MAX_STATUS_PAGES,
    MONITOR_EVENTS,
    Demux,
    ReadyPoll,
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

CLOSE_LINGER_MS = 100  # bounded: lets the last CANCELs leave on close


async def _send(sock: zmq.asyncio.Socket, msg: Any) -> bool:
    """Send without waiting; False when the HWM is reached (the broker is not reading)."""
    try:
        await sock.send_multipart(frames.encode(msg), flags=zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return False
    return True


async def _read_loop(sock: zmq.asyncio.Socket, demux: Demux) -> None:
    """Reader task (module-level, so a pending task does not keep the client alive)."""
    try:
        while True:
            demux.on_frames(await sock.recv_multipart(copy=False))
    except asyncio.CancelledError:
        raise
    except Exception as e:
        logger.exception("[dead] asyncio client reader for %s failed", demux.addr)
        why = f"client reader failed: {e!r}"
        demux.fail_all(lambda: ConnectionFailed(why))


async def _watch_loop(monitor: zmq.asyncio.Socket, sock: zmq.asyncio.Socket, demux: Demux) -> None:
    """Watcher task: connection up / down / handshake failures from the socket monitor."""
    while True:
        info = parse_monitor_message(await monitor.recv_multipart())
        event = info["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            for msg in demux.on_connected():
                await _send(sock, msg)
        elif event == zmq.EVENT_DISCONNECTED:
            for rid in demux.on_disconnected():
                await _send(sock, Cancel(rid))  # queued: the GENERATE may not have left
        else:
            demux.on_handshake_failed(info)


def _abandon(tasks: list[asyncio.Task[None]], ctx: zmq.asyncio.Context) -> None:
    """weakref.finalize of an AsyncClient never closed: stop its tasks, drop its sockets."""
    for task in tasks:
        with contextlib.suppress(RuntimeError):  # its loop may be closed already
            task.cancel()
    with contextlib.suppress(Exception):
        ctx.destroy(linger=0)


class AsyncClient:
    """asyncio BlockLLM client; same arguments and errors as `Client`."""

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
        self.demux = Demux(addr)
        self.demux.keyed = curve is not None
        self._ctx = zmq.asyncio.Context()
        try:
            self._sock = open_dealer(self._ctx, addr, curve)
            self._monitor = self._sock.get_monitor_socket(MONITOR_EVENTS)
            connect_dealer(self._sock, addr)
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _abandon, self._tasks, self._ctx)

    def __repr__(self) -> str:
        return f"AsyncClient({self.addr!r})"

    async def __aenter__(self) -> AsyncClient:
        self._ensure_tasks()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _ensure_tasks(self) -> None:
        if self._closed:
            raise ConnectionFailed(f"client for {self.addr} is closed")
        loop = asyncio.get_running_loop()
        if not self._tasks:
            self._loop = loop
            self._tasks.append(loop.create_task(_read_loop(self._sock, self.demux)))
            self._tasks.append(loop.create_task(_watch_loop(self._monitor, self._sock, self.demux)))
        elif loop is not self._loop:
            raise ConnectionFailed("an AsyncClient serves one event loop: make one per loop")

    async def close(self) -> None:
        """Fail in-flight requests (ConnectionFailed), cancel them, close the sockets."""
        if self._closed:
            return
        self._closed = True
        if self._tasks and asyncio.get_running_loop() is not self._loop:
            self._finalizer()  # its loop is gone: drop everything without awaiting
            return
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        rids = self.demux.fail_all(lambda: ConnectionFailed(f"client for {self.addr} was closed"))
        for rid in rids:
            await _send(self._sock, Cancel(rid))
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        # Not 0: the CANCELs just sent (here, or by a stream closed right before) must leave.
        self._sock.close(linger=CLOSE_LINGER_MS)
        self._ctx.term()
        self._finalizer.detach()

    # ---- requests ------------------------------------------------------------------------
    async def _submit(
        self, msg: Generate | StatusRequest | Fetch, maxsize: int
    ) -> asyncio.Queue[Any]:
        self._ensure_tasks()
        q: asyncio.Queue[Any] = asyncio.Queue(maxsize)
        self.demux.add(msg, q.put_nowait)
        if not await _send(self._sock, msg):
            self.demux.remove(msg.request_id)
            raise send_refused(self.demux)
        return q

    async def _next(
        self, q: asyncio.Queue[Any], t0: float, timeout: float | None, grace: bool
    ) -> Any:
        """As Client._next: the next item, Timeout, or BrokerUnavailable."""
        if not q.empty():  # fast path (a stream's tokens often wait already): no future
            wait_budget(self.demux, t0, timeout, grace, self.connect_timeout)
            item = q.get_nowait()
            if item is not CONNECTION_LOST:
                return item
        getter = asyncio.ensure_future(q.get())  # kept across slices: no item is lost
        try:
            while True:
                if getter.done() and getter.result() is CONNECTION_LOST:
                    getter = asyncio.ensure_future(q.get())
                left = wait_budget(self.demux, t0, timeout, grace, self.connect_timeout)
                done, _ = await asyncio.wait({getter}, timeout=left)
                if done and getter.result() is not CONNECTION_LOST:
                    return getter.result()
        finally:
            getter.cancel()

    async def status(
        self, timeout: float | None = 10.0, *, model: str = "", worker: str = ""
    ) -> dict[str, Any]:
        """The broker's STATUS body (every page, merged: Client.status); raises Timeout /
        BrokerUnavailable."""
        body: dict[str, Any] = {}
        offset = 0
        for _ in range(MAX_STATUS_PAGES):
            page = await self._status_page(timeout, model, worker, offset)
            body = body or page
            offset = merge_status(body, page)
            if not offset:
                break
        body.pop("page", None)  # the pages are merged: the whole lists
        return body

    async def _status_page(
        self, timeout: float | None, model: str, worker: str, offset: int
    ) -> dict[str, Any]:
        """One STATUS answer: entries [offset, offset + the broker's page) of each list."""
        item = await self._ask(StatusRequest(new_request_id(), model, worker, offset), timeout)
        return plain(item.body)  # the JSON-shaped body (protocol bodies.py)

    async def _ask(self, msg: StatusRequest | Fetch, timeout: float | None) -> Any:
        """Send `msg` and wait for its one answer; raises the broker's error, Timeout,
        BrokerUnavailable."""
        q = await self._submit(msg, 2)
        try:
            item = await self._next(q, time.monotonic(), timeout, grace=timeout is None)
        except BlockLLMError:
            self.demux.remove(msg.request_id)
            raise
        err = reply_error(item)
        if err is not None:
            raise err
        return item

    async def fetch(self, what: str, name: str, timeout: float | None = 30.0) -> bytes:
        """A whole object of the broker's zoo (`what`: "manifest" (name: a model) or
        "tokenizer" (name: "<tokenizer id>/<file>"), see broker/fetch.py), chunk by chunk.
        Raises UnknownModel / BadRequest (no such object), Timeout, BrokerUnavailable."""
        data = bytearray()
        total: int | None = None
        while total is None or len(data) < total:
            blob, chunk = await self._ask(Fetch(new_request_id(), what, name, len(data)), timeout)
            if (
                not isinstance(blob, Blob)
                or blob.offset != len(data)
                or (not chunk and len(data) < blob.total)
            ):
                raise ConnectionFailed(f"bad answer to FETCH {what} {name} from {self.addr}")
            data += chunk
            total = blob.total
        return bytes(data)

    async def wait_ready(
        self, models: Sequence[str] | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        """As Client.wait_ready: poll STATUS until the models are covered."""
        poll = ReadyPoll(self.addr, models, timeout)
        while True:
            if poll.left() > 0:
                try:
                    if poll.covered(await self.status(timeout=poll.left())):
                        return poll.body
                except Timeout as e:
                    poll.unanswered(e)
            await asyncio.sleep(poll.pause())

    def stream(
        self,
        model: str,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        *,
        params: GenerateParams | None = None,
        **fields: Any,
    ) -> AsyncIterator[TokenEvent]:
        """`async for ev in c.stream(...)`; arguments as `Client.stream`. BadRequest at once for
        bad arguments, the request is sent on the first iteration; leaving the loop early
        cancels it."""
        msg, timeout = self._message(model, prompt, input_ids, GenerateParams.of(params, fields))
        return self._events(msg, timeout)

    def _message(
        self, model: str, prompt: str | None, input_ids: Sequence[int] | None, p: GenerateParams
    ) -> tuple[Generate, float | None]:
        """The GENERATE (this client's default timeout applied) and the request's timeout."""
        if p.timeout is None:
            p = replace(p, timeout=self.timeout)
        return build_generate(model, prompt, input_ids, p), p.timeout

    async def _events(self, msg: Generate, timeout: float | None) -> AsyncIterator[TokenEvent]:
        tokens = self._tokens(msg, timeout)
        try:
            async for tok in tokens:
                yield to_event(tok)
        finally:  # leaving early closes (cancels) the request now, not at garbage collection
            await tokens.aclose()

    def tokens(
        self,
        model: str,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        *,
        params: GenerateParams | None = None,
        **fields: Any,
    ) -> AsyncIterator[Token]:
        """As `stream`, but the raw TOKEN messages (broker/protocol/): the prompt's
        log-probabilities (GenerateParams.prompt_logprobs) in the first, the alternatives
        flattened; `index` counts from 0 across resumes. What the HTTP front end reads."""
        msg, timeout = self._message(model, prompt, input_ids, GenerateParams.of(params, fields))
        return self._tokens(msg, timeout)

    async def _tokens(self, msg: Generate, timeout: float | None) -> AsyncIterator[Token]:
        t0 = time.monotonic()
        q = await self._submit(msg, msg.max_new_tokens + 2)
        finished = False
        try:
            while not finished:
                item = await self._next(q, t0, timeout, grace=True)
                err = reply_error(item)
                if err is not None:
                    finished = True
                    raise err
                finished = item.finish_reason is not None
                yield item
        finally:
            wire_id = None if finished else self.demux.remove(msg.request_id)
            if wire_id is not None and not self._sock.closed:  # also while close() runs
                with contextlib.suppress(zmq.ZMQError):
                    await _send(self._sock, Cancel(wire_id))

    async def generate(
        self,
        model: str,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        *,
        params: GenerateParams | None = None,
        **fields: Any,
    ) -> Completion:
        """Generate to the end; raises as `Client.generate` does."""
        msg, timeout = self._message(model, prompt, input_ids, GenerateParams.of(params, fields))
        acc = Accumulator()
        tokens = self._tokens(msg, timeout)
        try:
            async for tok in tokens:
                acc.add(tok)
        finally:
            await tokens.aclose()
        return acc.completion()


__all__ = ["AsyncClient"]
