"""POST /v1/chat/completions: the tenant's own chat template (from its tokenizer files in the
zoo) with the generation prompt, n choices, stop sequences, logprobs, streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from blockllm.client.chat_template import ChatTemplateError, chat_prompt_ids
from blockllm.client.errors import BlockLLMError
from blockllm.client.http import responses as R
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
from blockllm.client.http.errors import bad_request, from_broker
from blockllm.client.http.schemas import ChatRequest


def render(tok: Any, model: str, req: ChatRequest) -> list[int]:
    """The prompt ids of the request's messages under the tenant's template; 400 if it has none
    or the template refuses them."""
    messages = []
    for m in req.messages:
        entry: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            entry["name"] = m.name
        messages.append(entry)
    try:
        ids = chat_prompt_ids(tok, model, messages)
    except ChatTemplateError as e:
        hint = ": use /v1/completions with a prompt" if "no chat template" in str(e) else ""
        raise bad_request(f"{e}{hint}", "messages") from None
    return check_prompt_ids(ids, "messages")


async def chat(call: Call, req: ChatRequest, request: Any) -> Any:
    try:
        tok = await call.app.tenants.tokenizer(call.model)
        manifest = await call.app.tenants.manifest(call.model)
    except BlockLLMError as e:
        raise from_broker(e, call.model) from None
    ids = render(tok, call.model, req)
    max_new = req.max_completion_tokens or req.max_tokens
    if max_new is None:  # KV is reserved for all of it: a bounded default, not the context
        limit = int(manifest.get("config", {}).get("max_position_embeddings", 0) or 0)
        room = limit - len(ids) if limit else call.cfg.default_max_tokens
        max_new = max(1, min(call.cfg.default_max_tokens, room))
    k = (req.top_logprobs or 0) if req.logprobs else 0
    gens = []
    for i in range(req.n):
        temp, seed = sampling(req.temperature, req.seed, i)
        gens.append(new_choice(call, ids, max_new, temp, req.top_p, seed, k))
    text = R.TokenText(tok)
    if req.stream:
        return await _stream(call, req, gens, ids, text, request)
    results = await unless_disconnected(request, collect(call, gens, req.stops(), lambda _j: ids))
    if results is None:
        call.status = 499
        call.finish(len(ids))
        from starlette.responses import Response

        return Response(status_code=499)
    choices = [
        R.chat_choice(
            c.index,
            c.text,
            c.finish_reason,
            R.chat_logprobs(text, c.tokens) if req.logprobs else None,
        )
        for c in results
    ]
    completion = sum(len(c.tokens) for c in results)
    call.finish(len(ids), completion)
    return R.chat_body(
        R.new_id("chatcmpl"), R.now(), req.model, choices, R.usage(len(ids), completion)
    )


async def _stream(
    call: Call, req: ChatRequest, gens: list[Any], ids: list[int], text: R.TokenText, request: Any
) -> Any:
    counts = [0] * len(gens)
    body = _events(call, req, gens, text, counts, len(ids))
    first = await first_event(request, body, call.model)
    if first is None:
        call.status = 499
        call.finish(len(ids))
        from starlette.responses import Response

        return Response(status_code=499)
    return ClosingStream(sse_stream(call, first, body, lambda: (len(ids), sum(counts))))


async def _events(
    call: Call,
    req: ChatRequest,
    gens: list[Any],
    text: R.TokenText,
    counts: list[int],
    prompt_tokens: int,
) -> AsyncIterator[bytes]:
    """Per choice: a first chunk with the role, then one per token (content, and logprobs if
    asked), the last with its finish reason; then the usage chunk if asked."""
    rid, created, model = R.new_id("chatcmpl"), R.now(), req.model
    with_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choice: dict[str, Any]) -> bytes:
        return R.sse(R.chat_chunk(rid, created, model, [choice], None, with_usage))

    started = [False] * len(gens)
    stream = deltas(call, gens, req.stops())
    try:
        async for d in stream:
            call.token_arrived()
            j = d.index
            counts[j] += 1
            if not started[j]:
                started[j] = True
                yield chunk(R.chat_delta(j, {"role": "assistant", "content": ""}, None))
            lp = R.chat_logprobs(text, [d.token]) if req.logprobs else None
            if not d.text and lp is None and d.finish_reason is None:
                continue
            delta = {"content": d.text} if d.text else {}
            yield chunk(R.chat_delta(j, delta, d.finish_reason, lp))
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    if with_usage:
        use = R.usage(prompt_tokens, sum(counts))
        yield R.sse(R.chat_chunk(rid, created, model, [], use, True))
