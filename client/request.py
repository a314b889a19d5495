"""Requests and their results, shared by the sync and asyncio clients (and the CLI).

`GenerateParams` holds a generation's sampling and limits and is validated in one place
(`validate`); `build_generate` turns a model, a prompt (text or token ids) and the params into
the GENERATE message. `TokenEvent` is one streamed token, `Completion` a finished generation,
and `Accumulator` builds one from TOKEN messages.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from blockllm.broker.protocol import MAX_PROMPT_TOP, MAX_TOP_LOGPROBS, Generate, Token
from blockllm.client.errors import BadRequest


@dataclass(frozen=True, slots=True)
class GenerateParams:
    """Sampling and limits of one generation. temperature 0 is greedy; top_k 0 and top_p 1
    disable those filters; `seed` makes sampling reproducible; `timeout` (seconds, None: the
    client's default) bounds the whole request.

    Log-probabilities (the model's own, before temperature and filtering): every token carries
    its `logprob`; `top_logprobs` (0..20) adds that many most likely alternatives per position;
    `prompt_logprobs` makes the first token also carry the prompt's (positions 1..T-1, then
    `top_logprobs` <= 5): `TokenEvent` carries a token's, the raw TOKEN messages of
    `AsyncClient.tokens` also the prompt's."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    timeout: float | None = None
    top_logprobs: int = 0
    prompt_logprobs: bool = False

    @classmethod
    def of(cls, params: GenerateParams | None, fields: Mapping[str, Any]) -> GenerateParams:
        """`params` (or the defaults) with `fields` (keyword arguments of a client call)
        replacing its values; TypeError naming an argument that is no field."""
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
        return dataclasses.replace(params or cls(), **fields)

    def validate(self) -> GenerateParams:
        """Self, or BadRequest naming the first bad value (checked before anything is sent)."""
        checks = (
            (
                isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
                "max_new_tokens must be >= 1",
            ),
            (self.temperature >= 0.0, "temperature must be >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an int >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (isinstance(self.seed, int), "seed must be an int"),
            (self.timeout is None or self.timeout > 0, "timeout must be > 0 seconds (or None)"),
            (isinstance(self.prompt_logprobs, bool), "prompt_logprobs must be a bool"),
            (
                _is_int(self.top_logprobs) and 0 <= self.top_logprobs <= self._most_top(),
                f"top_logprobs{' with prompt_logprobs' if self.prompt_logprobs else ''} must "
                f"be an int in [0, {self._most_top()}]",
            ),
        )
        for ok, what in checks:
            if not ok:
                raise BadRequest(what)
        return self

    def _most_top(self) -> int:
        return MAX_PROMPT_TOP if self.prompt_logprobs else MAX_TOP_LOGPROBS


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token: `text` is the new text it completes ("" while a multi-byte
    character is pending); `finish_reason` is None until the last event ("stop"/"length");
    `logprob` is the model's log-probability of the token, `top_logprobs` the
    GenerateParams.top_logprobs most likely (token id, logprob) there, most likely first."""

    token_id: int
    text: str
    index: int
    finish_reason: str | None = None
    logprob: float = 0.0
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished generation: generated ids, their text, "stop" or "length"."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int | None = None


def new_request_id() -> str:
    return uuid.uuid4().hex


def build_generate(
    model: str, prompt: str | None, input_ids: Sequence[int] | None, params: GenerateParams
) -> Generate:
    """A validated GENERATE message; raises BadRequest locally for bad arguments. `params`
    carries the timeout to send (the caller's default already applied)."""
    if not isinstance(model, str) or not model:
        raise BadRequest("model must be a non-empty string")
    if (prompt is None) == (input_ids is None):
        raise BadRequest("give exactly one of prompt= or input_ids=")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRequest(f"prompt must be a str, got {type(prompt).__name__}")
    ids: tuple[int, ...] | None = None
    if input_ids is not None:
        ids = tuple(input_ids)
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise BadRequest("input_ids must be a non-empty sequence of ints")
        if min(ids) < 0:
            raise BadRequest("input_ids must be >= 0")
    p = params.validate()
    return Generate(
        request_id=new_request_id(),
        model=model,
        prompt=prompt,
        input_ids=ids,
        max_new_tokens=p.max_new_tokens,
        temperature=float(p.temperature),
        top_k=p.top_k,
        top_p=float(p.top_p),
        seed=p.seed,
        timeout_s=float(p.timeout or 0.0),
        top_logprobs=p.top_logprobs,
        prompt_logprobs=p.prompt_logprobs,
    )


def to_event(t: Token) -> TokenEvent:
    top = tuple(zip(t.top_ids, t.top_logprobs, strict=True)) if t.top_ids else ()
    return TokenEvent(t.token_id, t.text, t.index, t.finish_reason, t.logprob, top)


@dataclass
class Accumulator:
    """Builds a Completion from TOKEN messages (sync and async clients)."""

    ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int | None = None

    def add(self, t: Token) -> None:
        self.ids.append(t.token_id)
        self.texts.append(t.text)
        self.finish_reason = t.finish_reason or self.finish_reason
        if t.prompt_tokens:
            self.prompt_tokens = t.prompt_tokens

    def completion(self) -> Completion:
        return Completion(self.ids, "".join(self.texts), self.finish_reason, self.prompt_tokens)
