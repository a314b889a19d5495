"""Request bodies of the OpenAI API as pydantic models (unknown fields allowed and ignored).

Defaults are OpenAI's (completions: max_tokens 16; temperature 1). Values are checked here so
that every bad field is a 400 naming it (errors.py turns pydantic's errors into that shape).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from blockllm.client.http.errors import ApiError, bad_request

MAX_N = 16
MAX_STOPS = 16
MAX_COMPLETIONS_LOGPROBS = 5  # OpenAI's completions limit (and the engine's with echo)
MAX_CHAT_TOP_LOGPROBS = 20
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or up to {MAX_STOPS} of them")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def check_supported(self) -> None:
        """400 for OpenAI fields this server does not implement, when they would matter."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported (send 0 or leave it out)", name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETIONS_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported", "best_of")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        self.prompts()  # 400 for an empty prompt (or list) now
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens must be >= 1 (0 only with echo)", "max_tokens")

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (strings or token-id lists)."""
        p = self.prompt
        if isinstance(p, str):
            out: list[Any] = [p]
        elif p and all(isinstance(x, int) for x in p):
            out = [list(p)]
        else:
            out = list(p)
        if not out or any(len(x) == 0 for x in out):
            raise bad_request("prompt must not be empty", "prompt")
        return out


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as text: a string, or the text parts of a list of content parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request("only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        if self.max_tokens == 0:
            raise bad_request("max_tokens must be >= 1", "max_tokens")


def parse(model: type[_Request], body: Any) -> Any:
    """Validate a JSON body; ApiError 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    req.check_supported()
    return req


def validation_error(errors: Any) -> ApiError:
    """pydantic's (or FastAPI's) error list -> one 400 naming the first bad field."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
    # a union's alternatives add their type names to the path: keep the field names only
    fields = [x for x in loc if not x.startswith(("list[", "str", "int", "dict["))]
    param = ".".join(fields) or None
    msg = first.get("msg", "invalid request")
    return bad_request(f"{param}: {msg}" if param else msg, param)
