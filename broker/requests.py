"""RequestState (one generation the broker drives) and GENERATE validation with typed errors."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

from blockllm.broker.config import BrokerConfig
from blockllm.broker.models import ModelSpec
from blockllm.broker.protocol import (
    MAX_PROMPT_TOP,
    MAX_TOP_LOGPROBS,
    ErrorCode,
    Generate,
    TensorMeta,
)
from blockllm.broker.routing import Hop
from blockllm.broker.text import IncrementalDetokenizer


class RequestError(Exception):
    """A request the broker refuses or fails: `code` is a protocol ErrorCode value."""

    def __init__(self, code: ErrorCode, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


def bad(message: str) -> RequestError:
    return RequestError(ErrorCode.BAD_REQUEST, message)


def wire_id(rid: str, attempt: int) -> str:
    """The id workers see for one attempt of a request (attempts > 0: hedged re-sends)."""
    return rid if attempt == 0 else f"{rid}~{attempt}"


def split_wire_id(wire: str) -> tuple[str, int]:
    """(request id, attempt) of a worker's request id; attempt -1 when it is malformed."""
    rid, sep, attempt = wire.partition("~")
    if not sep:
        return rid, 0
    return (rid, int(attempt)) if attempt.isdigit() else (rid, -1)


@dataclass(slots=True)
class Shadow:
    """A hedged attempt racing the current step on another route: a prefill of prompt +
    generated tokens; the first of the two to produce the step's token wins."""

    attempt: int
    route: list[Hop]
    hop: int = 0


@dataclass(slots=True)
class RequestState:
    """One generation: its history (for replay), its route and where the current step is.

    `rid` is the broker's own id, used on the worker side (two clients may both call their
    request "r1"); the client's id is `client_rid`.
    """

    rid: str
    client: bytes
    client_rid: str
    spec: ModelSpec
    prompt: tuple[int, ...]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    deadline: float
    created: float
    generated: list[int] = field(default_factory=list)
    detok: IncrementalDetokenizer | None = None
    route: list[Hop] | None = None
    hop: int = 0
    step: int = 0
    past_len: int = 0
    prefill: bool = True  # the next step re-sends prompt + generated with past_len 0
    replays: int = 0
    avoid: set[bytes] = field(default_factory=set)
    last_failure: str = ""
    routed_gen: int = 0  # the broker's routes generation when this route was chosen
    last_token_at: float = 0.0  # when the last token was emitted (0: none yet)
    attempt: int = 0  # which attempt the route runs (see wire_id)
    attempts: int = 0  # attempts made so far
    hop_sent_at: float = 0.0  # when the current hop's FORWARD left
    shadow: Shadow | None = None
    top_logprobs: int = 0  # alternatives per position (Generate.top_logprobs)
    prompt_logprobs: bool = False  # the first TOKEN carries the prompt's logprobs; then False

    def targets(self, hop: Hop, past_len: int) -> tuple[int, ...]:
        """What a FORWARD of a prefill to the head's hop asks for the prompt's logprobs."""
        if not self.prompt_logprobs or past_len != 0 or hop.spans[-1][1] != self.spec.chain_len:
            return ()
        return self.prompt[1:]

    @property
    def wire_id(self) -> str:
        return wire_id(self.rid, self.attempt)

    @property
    def model(self) -> str:
        return self.spec.name

    @property
    def max_total_len(self) -> int:
        return len(self.prompt) + self.max_new_tokens

    def workers(self) -> list[bytes]:
        """The distinct workers of the current route, in hop order."""
        return list(dict.fromkeys(h.worker for h in self.route or ()))

    def step_tokens(self) -> int:
        """How many new positions the step in flight runs (its input's length)."""
        return len(self.prompt) + len(self.generated) - self.past_len

    def step_input(self) -> tuple[list[int], int]:
        """Token ids for the next step's first hop and its past_len."""
        if self.prefill:
            return [*self.prompt, *self.generated], 0
        return [self.generated[-1]], len(self.prompt) + len(self.generated) - 1


HIDDEN_DTYPES = frozenset({"float32", "bfloat16", "float16"})


def hidden_problem(req: RequestState, metas: tuple[TensorMeta, ...], tokens: int) -> str:
    """Why a mid-route RESULT cannot be the next hop's input ("" = it can): one hidden-state
    tensor [tokens, hidden size] of a float dtype, `tokens` the step's new positions. The
    broker checks the header only (the frames are forwarded untouched, never decoded)."""
    if len(metas) != 1:
        return f"RESULT mid-route with {len(metas)} tensors"
    meta, hidden = metas[0], req.spec.hidden_size
    if meta.dtype not in HIDDEN_DTYPES:
        return f"RESULT mid-route with a {meta.dtype} tensor"
    if len(meta.shape) != 2 or meta.shape[0] != tokens or (hidden and meta.shape[1] != hidden):
        want = f"({tokens}, {hidden or 'hidden'})"
        return f"RESULT mid-route with shape {tuple(meta.shape)}, expected {want}"
    return ""


def token_frame(ids: list[int]) -> tuple[TensorMeta, bytes]:
    """An int64 [T] tensor frame of token ids (little-endian, as torch lays it out on x86/arm)."""
    return TensorMeta("int64", (len(ids),)), struct.pack(f"<{len(ids)}q", *ids)


def _check_ids(ids: tuple[int, ...], vocab: int, what: str) -> None:
    for tid in ids:
        if not 0 <= tid < vocab:
            raise bad(f"{what} contain token id {tid}, outside the vocabulary [0, {vocab})")


def _check_sampling(msg: Generate) -> None:
    if not math.isfinite(msg.temperature) or msg.temperature < 0:
        raise bad(f"temperature must be >= 0, got {msg.temperature}")
    if not math.isfinite(msg.top_p) or not 0.0 < msg.top_p <= 1.0:
        raise bad(f"top_p must be in (0, 1], got {msg.top_p}")
    if msg.top_k < 0:
        raise bad(f"top_k must be >= 0, got {msg.top_k}")
    if not -(1 << 63) <= msg.seed < (1 << 63):
        raise bad("seed must fit in 64 bits")
    if not math.isfinite(msg.timeout_s) or msg.timeout_s < 0:
        raise bad(f"timeout_s must be >= 0 (0: the broker's default), got {msg.timeout_s}")
    most = MAX_PROMPT_TOP if msg.prompt_logprobs else MAX_TOP_LOGPROBS
    if not 0 <= msg.top_logprobs <= most:
        what = " with prompt_logprobs" if msg.prompt_logprobs else ""
        raise bad(f"top_logprobs{what} must be in [0, {most}], got {msg.top_logprobs}")


def prompt_ids(msg: Generate, spec: ModelSpec, cfg: BrokerConfig) -> tuple[int, ...]:
    """The prompt as token ids: `input_ids`, or the text tokenized as a HF user would."""
    if msg.prompt is not None and msg.input_ids is not None:
        raise bad("give either prompt or input_ids, not both")
    if msg.input_ids is not None:
        return msg.input_ids
    if not msg.prompt:
        raise bad("empty prompt")
    if len(msg.prompt) > 64 * cfg.max_prompt_tokens:  # refuse before paying for tokenizing
        raise bad(f"prompt of {len(msg.prompt)} characters exceeds the prompt limit")
    if spec.tokenizer is None:
        raise bad(f"model {spec.name!r} has no tokenizer in the zoo: send input_ids")
    return tuple(int(t) for t in spec.tokenizer(msg.prompt).input_ids)


def validate(msg: Generate, spec: ModelSpec, cfg: BrokerConfig) -> tuple[int, ...]:
    """The request's prompt ids, or RequestError(BAD_REQUEST) naming what is wrong."""
    _check_sampling(msg)
    if not 1 <= msg.max_new_tokens <= cfg.max_new_tokens_limit:
        raise bad(f"max_new_tokens must be in [1, {cfg.max_new_tokens_limit}]")
    ids = prompt_ids(msg, spec, cfg)
    if not ids:
        raise bad("empty prompt")
    if len(ids) > cfg.max_prompt_tokens:
        raise bad(f"prompt has {len(ids)} tokens, more than the limit {cfg.max_prompt_tokens}")
    _check_ids(ids, spec.vocab_size, "input_ids")
    _check_ids(msg.resume_ids, spec.vocab_size, "resume_ids")
    if len(msg.resume_ids) >= msg.max_new_tokens:
        raise bad("resume_ids already hold max_new_tokens tokens: nothing left to generate")
    if msg.resume_ids and msg.resume_ids[-1] in spec.eos_ids:
        raise bad("resume_ids end with an EOS token: the generation is already finished")
    if len(ids) + msg.max_new_tokens > spec.max_positions:
        raise bad(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({msg.max_new_tokens}) exceeds "
            f"max_position_embeddings {spec.max_positions} of {spec.name!r}"
        )
    return ids
