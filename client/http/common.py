"""What the completions and chat handlers share: the per-request context, the generation
params of the choices, the wait that gives up when the HTTP client disconnects, SSE responses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.responses import StreamingResponse

from blockllm.client.errors import BadRequest, BlockLLMError
from blockllm.client.http.choices import Choice, ChoiceResult, Delta, merged, run_choice
from blockllm.client.http.errors import ApiError, bad_request, from_broker
from blockllm.client.http.responses import DONE, sse
from blockllm.client.request import GenerateParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
SEED_MASK = (1 << 63) - 1
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Call:
    """One API request on its way: the app's services plus what the request chose."""

    app: Any  # the app's State: client, tenants, cfg, metrics
    endpoint: str
    model: str = "-"
    t0: float = field(default_factory=time.monotonic)
    first_token_at: float = 0.0
    status: int = 200

    @property
    def client(self) -> Any:
        return self.app.client

    @property
    def cfg(self) -> Any:
        return self.app.cfg

    def token_arrived(self) -> None:
        if not self.first_token_at:
            self.first_token_at = time.monotonic()
            if self.app.metrics is not None:
                self.app.metrics.ttft.labels(self.endpoint).observe(self.first_token_at - self.t0)

    def finish(self, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        m = self.app.metrics
        if m is not None:
            m.done(self.endpoint, self.model, self.status, time.monotonic() - self.t0)
            if prompt_tokens or completion_tokens:
                m.tokens(self.model, prompt_tokens, completion_tokens)


def sampling(temperature: float | None, seed: int | None, i: int) -> tuple[float, int]:
    """(temperature, seed) of choice i: OpenAI's default temperature 1; a given seed s makes
    choice i use s + i (reproducible, different choices); none: a random one when sampling."""
    temp = 1.0 if temperature is None else float(temperature)
    if seed is not None:
        return temp, (seed + i) & SEED_MASK
    return temp, secrets.randbits(62) if temp > 0 else 0


def new_choice(
    call: Call,
    ids: list[int],
    max_new: int,
    temperature: float,
    top_p: float | None,
    seed: int,
    top_logprobs: int = 0,
    prompt_logprobs: bool = False,
) -> Choice:
    """One choice: its prompt ids and its GenerateParams, validated (400 naming a bad value)."""
    params = GenerateParams(
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=1.0 if top_p is None else float(top_p),
        seed=seed,
        timeout=call.cfg.request_timeout_s or None,  # None: the broker's default
        top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    try:
        return Choice(tuple(ids), params.validate())
    except BadRequest as e:
        raise bad_request(e.message) from None


def deltas(call: Call, choices: list[Choice], stops: tuple[str, ...]) -> AsyncIterator[Delta]:
    """The merged deltas of the `choices` (choice i = choices[i])."""
    runs = [run_choice(call.client, i, call.model, c, stops) for i, c in enumerate(choices)]
    return merged(runs)


async def collect(
    call: Call,
    choices: list[Choice],
    stops: tuple[str, ...],
    prompt_ids: Callable[[int], list[int]],
) -> list[ChoiceResult]:
    """Every choice run to its end (a non-streaming answer): choice i's ChoiceResult, over
    `prompt_ids(i)`. Raises ApiError (the broker's error, as OpenAI's)."""
    results = [ChoiceResult(j, prompt_ids(j)) for j in range(len(choices))]
    stream = deltas(call, choices, stops)
    try:
        async for d in stream:
            call.token_arrived()
            results[d.index].add(d)
    except BlockLLMError as e:
        raise from_broker(e, call.model) from None
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    return results


async def until_disconnect(request: Any) -> None:
    """Returns when the HTTP client has gone (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Any, work: Awaitable[T]) -> T | None:
    """`await work`, or cancel it (its requests at the broker with it) and return None when
    the HTTP client disconnects first. Errors of `work` are raised as they are."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        logger.info("[http] client went away; its requests were cancelled at the broker")
        return None
    return task.result()


async def first_event(request: Any, body: AsyncIterator[bytes], model: str) -> bytes | None:
    """The first SSE event of a stream, before any header is sent, so that an error before
    the first token still gets its HTTP status. None: the client went away meanwhile."""

    async def first() -> bytes:
        try:
            return await body.__anext__()
        except BlockLLMError as e:
            raise from_broker(e, model) from None
        except StopAsyncIteration:
            raise ApiError(500, "empty stream", "internal_error") from None

    got = await unless_disconnected(request, first())
    if got is None:
        await body.aclose()  # type: ignore[attr-defined]
    return got


async def sse_stream(
    call: Call, first: bytes, body: AsyncIterator[bytes], usage: Callable[[], tuple[int, int]]
) -> AsyncIterator[bytes]:
    """The rest of a stream after its first event; an error now is one `data: {"error"}`
    event, then the end. The finally cancels what still runs at the broker (a client that
    disconnected is noticed by the server, which cancels this generator)."""
    call.app.metrics and call.app.metrics.streams.inc()
    ok = False
    try:
        yield first
        try:
            async for event in body:
                yield event
            ok = True
        except BlockLLMError as e:
            err = from_broker(e, call.model)
            call.status = err.status
            yield sse(err.body())
            return
        except ApiError as e:
            call.status = e.status
            yield sse(e.body())
            return
        yield DONE
    finally:
        if not ok and call.status == 200:
            call.status = 499  # the client went away
        call.app.metrics and call.app.metrics.streams.dec()
        call.finish(*usage())
        await body.aclose()  # type: ignore[attr-defined]


class ClosingStream(StreamingResponse):
    """The SSE response: however it ends (done, an error, the client gone while a chunk was
    being sent), its body generator is closed at once, cancelling its broker requests."""

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def check_prompt_ids(ids: list[int], what: str = "prompt") -> list[int]:
    if not ids:
        raise bad_request(f"{what} is empty after tokenization", "prompt")
    if any(isinstance(t, bool) or t < 0 for t in ids):
        raise bad_request("token ids must be >= 0", "prompt")
    return ids
