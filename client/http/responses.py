"""OpenAI response bodies: `text_completion`, `chat.completion`, `chat.completion.chunk`,
usage, the two logprobs shapes, and server-sent events."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from blockllm.broker.protocol import Token
from blockllm.client.http.choices import ChoiceResult, alternatives

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + _dumps(obj).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class TokenText:
    """Token ids as the strings logprobs show (one id decoded alone), cached per id."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            if self.tok is None:
                s = f"token_id:{token_id}"
            else:
                s = self.tok.decode([token_id], skip_special_tokens=False)
            if len(self._cache) < 65536:
                self._cache[token_id] = s
        return s


# -- completions ------------------------------------------------------------------------------


def _lp(x: float) -> float:
    return x if x == x and x not in (float("inf"), float("-inf")) else -9999.0


def _top_dict(text: TokenText, alts: Sequence[tuple[int, float]]) -> dict[str, float]:
    """Alternatives keyed by token text; ids that decode alike keep the likelier one."""
    out: dict[str, float] = {}
    for t, lp in alts:
        out.setdefault(text(t), _lp(lp))
    return out


def completion_logprobs(
    text: TokenText, tokens: Sequence[Token], start_offset: int
) -> dict[str, Any]:
    """The completions `logprobs` object of generated tokens (offsets from start_offset)."""
    out: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    offset = start_offset
    for tok in tokens:
        s = text(tok.token_id)
        out["tokens"].append(s)
        out["token_logprobs"].append(_lp(tok.logprob))
        out["top_logprobs"].append(_top_dict(text, alternatives(tok)))
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def echo_logprobs(text: TokenText, c: ChoiceResult) -> dict[str, Any]:
    """The prompt part of `logprobs` with echo: the first token has none (null)."""
    out: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    offset = 0
    for i, tid in enumerate(c.prompt_ids):
        s = text(tid)
        out["tokens"].append(s)
        out["text_offset"].append(offset)
        offset += len(s)
        if i == 0 or i - 1 >= len(c.prompt_logprobs):
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_lp(c.prompt_logprobs[i - 1]))
        alts = c.prompt_top[i - 1] if i - 1 < len(c.prompt_top) else []
        out["top_logprobs"].append(_top_dict(text, alts))
    return out


def join_logprobs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: a[k] + b[k] for k in a}


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(
    rid: str, created: int, model: str, choices: list[dict[str, Any]], use: dict[str, int] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if use is not None:
        body["usage"] = use
    return body


# -- chat ---------------------------------------------------------------------------------------


def _chat_entry(text: TokenText, token_id: int, logprob: float) -> dict[str, Any]:
    s = text(token_id)
    return {"token": s, "logprob": _lp(logprob), "bytes": list(s.encode("utf-8"))}


def chat_logprobs(text: TokenText, tokens: Sequence[Token]) -> dict[str, Any]:
    content = []
    for tok in tokens:
        entry = _chat_entry(text, tok.token_id, tok.logprob)
        entry["top_logprobs"] = [_chat_entry(text, t, lp) for t, lp in alternatives(tok)]
        content.append(entry)
    return {"content": content, "refusal": None}


def chat_body(
    rid: str, created: int, model: str, choices: list[dict[str, Any]], use: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
    }


def chat_choice(
    index: int, content: str, finish_reason: str, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": content, "refusal": None},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    use: dict[str, int] | None = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if with_usage:
        body["usage"] = use
    return body


def chat_delta(
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
