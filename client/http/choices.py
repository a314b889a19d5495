"""One choice of a request: its GENERATE at the broker, stop sequences, and what the response
needs of it (text, tokens, logprobs, finish reason). Several choices (`n`, or a list of
prompts) run concurrently on the event loop and are merged into one stream of deltas.

A choice that finishes early (a stop sequence) or is abandoned (the HTTP client went away, an
error in a sibling choice) leaves its token iterator, which cancels the request at the broker
at once (AsyncClient: CANCEL), so its KV is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from blockllm.broker.protocol import Token
from blockllm.client.request import GenerateParams


class StopMatcher:
    """Cuts the text at the first stop string; holds back a tail that could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text to release now, whether a stop string was hit: the rest is dropped)."""
        if not self.stops:
            return text, False
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        keep = 0  # the longest tail of buf that is a prefix of a stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:n]):
                    keep = n
                    break
        out = self.buf[: len(self.buf) - keep]
        self.buf = self.buf[len(self.buf) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


@dataclass(slots=True)
class Delta:
    """One token of one choice: the broker's TOKEN, the text it releases (after stop
    handling) and, on the last one, the finish reason ("stop" or "length")."""

    index: int
    token: Token
    text: str
    finish_reason: str | None


@dataclass
class ChoiceResult:
    """Everything a non-streamed response needs of one choice."""

    index: int
    prompt_ids: list[int]
    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_logprobs: tuple[float, ...] = ()
    prompt_top: list[list[tuple[int, float]]] = field(default_factory=list)

    def add(self, d: Delta) -> None:
        if not self.tokens:  # the first TOKEN carries the prompt's logprobs, when asked
            self.prompt_logprobs = d.token.prompt_logprobs
            self.prompt_top = prompt_alternatives(d.token, len(self.prompt_ids))
        self.tokens.append(d.token)
        self.text += d.text
        if d.finish_reason:
            self.finish_reason = d.finish_reason


def alternatives(tok: Token) -> list[tuple[int, float]]:
    return list(zip(tok.top_ids, tok.top_logprobs, strict=False))


def prompt_alternatives(tok: Token, prompt_len: int) -> list[list[tuple[int, float]]]:
    """Per scored prompt position (1..T-1), its alternatives (flattened on the wire)."""
    rows = max(len(tok.prompt_logprobs), 0)
    if not rows:
        return []
    k = len(tok.prompt_top_ids) // rows
    pairs = list(zip(tok.prompt_top_ids, tok.prompt_top_logprobs, strict=False))
    return [pairs[i * k : (i + 1) * k] for i in range(rows)]


class Choice(NamedTuple):
    """One choice of a request: the prompt's token ids and how to generate."""

    ids: tuple[int, ...]
    params: GenerateParams


async def run_choice(
    client: Any, index: int, model: str, choice: Choice, stops: Sequence[str]
) -> AsyncIterator[Delta]:
    """The deltas of one choice; raises the client library's errors (BlockLLMError)."""
    matcher = StopMatcher(stops)
    tokens = client.tokens(model, input_ids=choice.ids, params=choice.params)
    try:
        async for tok in tokens:
            text, stopped = matcher.push(tok.text)
            finish = "stop" if stopped else tok.finish_reason
            if finish and not stopped:
                text += matcher.flush()
            yield Delta(index, tok, text, finish)
            if stopped:
                break  # the finally below cancels the rest at the broker
    finally:
        await tokens.aclose()


async def merged(runs: Sequence[AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
    """The deltas of several choices as they come. The first error of any choice is raised
    and the others are cancelled (so are all when the consumer leaves early)."""
    if len(runs) == 1:
        it = runs[0]
        try:
            async for d in it:
                yield d
        finally:
            await it.aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[Delta | None, BaseException | None]] = asyncio.Queue()

    async def pump(it: AsyncIterator[Delta]) -> None:
        try:
            async for d in it:
                queue.put_nowait((d, None))
        except Exception as e:  # handed to the consumer; cancellation is not
            queue.put_nowait((None, e))
            return
        finally:
            with contextlib.suppress(Exception):
                await it.aclose()  # type: ignore[attr-defined]
        queue.put_nowait((None, None))

    tasks = [asyncio.create_task(pump(it)) for it in runs]
    try:
        done = 0
        while done < len(tasks):
            delta, err = await queue.get()
            if err is not None:
                raise err
            if delta is None:
                done += 1
                continue
            yield delta
    finally:
        for t in tasks:  # sync: also safe while this generator is being cancelled
            t.cancel()
