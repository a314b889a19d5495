"""POST /v1/completions: prompts (text or token ids, one or a list) x n choices, echo with the
prompt's logprobs, stop sequences, streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from blockllm.client.errors import BlockLLMError
from blockllm.client.http import responses as R
from blockllm.client.http.choices import ChoiceResult
from blockllm.client.http.common import (
    Call,
    ClosingStream,
    check_prompt_ids,
    collect,
    deltas,
    first_event,
    new_choice,
    sampling,
    sse_stream,
    unless_disconnected,
)
from blockllm.client.http.errors import ApiError, bad_request, from_broker
from blockllm.client.http.schemas import CompletionRequest


@dataclass
class Plan:
    """The choices of one completions request: choice j = prompt j // n, sample j % n."""

    req: CompletionRequest
    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    text: R.TokenText
    gens: list[Any]

    def prompt_of(self, j: int) -> int:
        return j // self.req.n

    @property
    def scored(self) -> bool:
        return self.req.logprobs is not None

    @property
    def echo_only(self) -> bool:  # max_tokens 0 with echo: score the prompt, generate nothing
        return self.req.max_tokens == 0

    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)


MAX_CHOICES = 128  # prompts x n of one request (each is a GENERATE at the broker)


async def plan(call: Call, req: CompletionRequest) -> Plan:
    prompts = req.prompts()
    if len(prompts) * req.n > MAX_CHOICES:
        raise bad_request(f"at most {MAX_CHOICES} prompts x n per request", "prompt")
    texts_given = any(isinstance(p, str) for p in prompts)
    tok = None
    try:
        tok = await call.app.tenants.tokenizer(call.model)
    except ApiError:  # no tokenizer: fine for token-id prompts
        if texts_given:
            raise
    except BlockLLMError as e:
        raise from_broker(e, call.model) from None
    ids_list, texts = [], []
    for p in prompts:
        if isinstance(p, str):
            ids_list.append(check_prompt_ids(list(tok(p).input_ids)))
            texts.append(p)
        else:
            ids_list.append(check_prompt_ids(list(p)))
            texts.append(tok.decode(p, skip_special_tokens=True) if tok is not None else "")
    k = req.logprobs or 0
    scored_prompt = req.echo and req.logprobs is not None
    gens = []
    for ids in ids_list:
        for i in range(req.n):
            temp, seed = sampling(req.temperature, req.seed, i)
            max_new = max(1, req.max_tokens or 0)
            gens.append(new_choice(call, ids, max_new, temp, req.top_p, seed, k, scored_prompt))
    return Plan(req, ids_list, texts, R.TokenText(tok), gens)


async def completions(call: Call, req: CompletionRequest, request: Any) -> Any:
    p = await plan(call, req)
    if req.stream:
        return await _stream(call, p, request)
    results = await unless_disconnected(
        request, collect(call, p.gens, p.req.stops(), lambda j: p.prompt_ids[p.prompt_of(j)])
    )
    if results is None:
        call.status = 499
        call.finish(p.prompt_tokens())
        from starlette.responses import Response

        return Response(status_code=499)
    choices = [_choice(p, c) for c in results]
    completion = 0 if p.echo_only else sum(len(c.tokens) for c in results)
    call.finish(p.prompt_tokens(), completion)
    use = R.usage(p.prompt_tokens(), completion)
    return R.completion_body(R.new_id("cmpl"), R.now(), req.model, choices, use)


def _choice(p: Plan, c: ChoiceResult) -> dict[str, Any]:
    prompt_text = p.prompt_texts[p.prompt_of(c.index)] if p.req.echo else ""
    if p.echo_only:
        c.text, c.tokens, c.finish_reason = "", [], "length"
    logprobs = None
    if p.scored:
        logprobs = R.completion_logprobs(p.text, c.tokens, len(prompt_text))
        if p.req.echo:
            logprobs = R.join_logprobs(R.echo_logprobs(p.text, c), logprobs)
    return R.completion_choice(c.index, prompt_text + c.text, c.finish_reason, logprobs)


async def _stream(call: Call, p: Plan, request: Any) -> Any:
    counts = [0] * len(p.gens)
    body = _events(call, p, counts)
    first = await first_event(request, body, call.model)
    if first is None:
        call.status = 499
        call.finish(p.prompt_tokens())
        from starlette.responses import Response

        return Response(status_code=499)

    def usage() -> tuple[int, int]:
        return p.prompt_tokens(), 0 if p.echo_only else sum(counts)

    return ClosingStream(sse_stream(call, first, body, usage))


async def _events(call: Call, p: Plan, counts: list[int]) -> AsyncIterator[bytes]:
    """The SSE events: one chunk per token (per choice), the usage chunk if asked."""
    rid, created, model = R.new_id("cmpl"), R.now(), p.req.model
    include_usage = bool(p.req.stream_options and p.req.stream_options.include_usage)
    started = [False] * len(p.gens)
    stream = deltas(call, p.gens, p.req.stops())
    try:
        async for d in stream:
            call.token_arrived()
            j = d.index
            counts[j] += 1
            choice = _chunk_choice(p, d, started[j])
            started[j] = True
            if choice is None:
                continue
            chunk = R.completion_body(rid, created, model, [choice], None)
            if include_usage:
                chunk["usage"] = None
            yield R.sse(chunk)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    if include_usage:
        completion = 0 if p.echo_only else sum(counts)
        use = R.usage(p.prompt_tokens(), completion)
        yield R.sse(R.completion_body(rid, created, model, [], use))


def _chunk_choice(p: Plan, d: Any, started: bool) -> dict[str, Any] | None:
    """One delta as a streamed choice (None: nothing to send for it)."""
    if not p.req.echo and not p.scored:  # the common case, once per token: keep it lean
        if not d.text and d.finish_reason is None:
            return None
        return R.completion_choice(d.index, d.text, d.finish_reason, None)
    c = ChoiceResult(d.index, p.prompt_ids[p.prompt_of(d.index)])
    c.add(d)
    prefix = p.prompt_texts[p.prompt_of(d.index)] if p.req.echo and not started else ""
    if p.echo_only:  # only the prompt, once, and the end
        return R.completion_choice(
            d.index, prefix, "length", R.echo_logprobs(p.text, c) if p.scored else None
        )
    text = prefix + d.text
    logprobs = None
    if p.scored:
        logprobs = R.completion_logprobs(p.text, [d.token], len(prefix))
        if prefix:
            logprobs = R.join_logprobs(R.echo_logprobs(p.text, c), logprobs)
    if not text and logprobs is None and d.finish_reason is None:
        return None
    return R.completion_choice(d.index, text, d.finish_reason, logprobs)
