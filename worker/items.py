"""Value types of the stage engine (importable without torch). See docs/internals.md,
"Engine API"; chain facts (`stage_key`, spans) are the zoo's (`blockllm.zoo.chain`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockllm.worker.errors import BadRequest, ErrorCode
from blockllm.zoo.chain import span_problem

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the head picks a token. temperature 0 = greedy; top_k 0 and top_p 1 = disabled."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> SamplingParams:
        """Self, or BadRequest naming the bad field (values come from peers)."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise BadRequest(f"temperature must be >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise BadRequest(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise BadRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise BadRequest(f"seed must be an integer, got {self.seed!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Engine settings of one worker (a frozen value, passed down explicitly)."""

    device: str = "cpu"
    kv_budget_bytes: int = 256 * 2**20  # the whole KV pool, shared by all stages
    max_batch_size: int = 32  # items per stage per step
    max_batch_tokens: int = 4096  # new tokens per stage per step (a longer prefill runs alone)
    queue_capacity: int = 256  # queued items per stage; beyond that submit raises QueueFull
    page_size: int = 16  # tokens per KV page
    threads: int | None = None  # torch.set_num_threads at construction; None = leave as is
    verify_blocks: bool = True  # re-hash blocks loaded from the zoo
    adapter_idle_blocks: int = 256  # LoRA adapter blocks kept resident while no request uses them
    # serve every block in this dtype ("float32", "bfloat16", "float16"), cast once at load
    # (the zoo keeps them as imported; KV follows the stage's dtype); None: as stored
    dtype: str | None = None


@dataclass(frozen=True, slots=True)
class StageInfo:
    """A loaded stage: chain positions [start, end) of `model` (and of `models` sharing it)."""

    key: str
    model: str
    start: int
    end: int
    nbytes: int  # weight bytes the stage holds (a tied head counts the embedding it uses)
    dtype: str
    device: str
    num_layers: int  # decoder layers in the stage
    chain_len: int  # positions of the model's whole chain (layers + 2)
    block_ids: tuple[str, ...]
    models: tuple[str, ...] = ()

    @property
    def has_embed(self) -> bool:
        return self.start == 0

    @property
    def has_head(self) -> bool:
        return self.end == self.chain_len


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One request's new positions to run through `stage_keys` (chain order) on this worker.

    `tokens` (int64 [T]) when the first stage holds the embedding, else `hidden` ([T, D]).
    `max_total_len` (0 = past_len + T) is what a `past_len == 0` item reserves KV for.
    """

    request_id: str
    step: int
    stage_keys: tuple[str, ...]
    past_len: int
    tokens: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    max_total_len: int = 0
    sampling: SamplingParams | None = None
    # head stage only: top-k alternatives of the sampled token (0: none), and the prompt's
    # tokens 1..T-1 whose log-probabilities at positions 0..T-2 to return (worker/logprobs.py)
    top_logprobs: int = 0
    targets: tuple[int, ...] = ()
    # LoRA: (chain position, adapter block id) of the positions of these stages where the
    # request's adapter applies (worker/lora.py); () = none
    adapters: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class WorkResult:
    """The outcome of one WorkItem: hidden [T, D] (mid-chain), a token (head), or an error."""

    request_id: str
    step: int
    hidden: torch.Tensor | None = None
    token_id: int | None = None
    logprob: float | None = None
    error: ErrorCode | None = None
    message: str = ""
    # with WorkItem.top_logprobs / targets: (token id, logprob) alternatives of the sampled
    # token, the targets' logprobs, and each target position's alternatives
    top: tuple[tuple[int, float], ...] = ()
    prompt_logprobs: tuple[float, ...] = ()
    prompt_top: tuple[tuple[tuple[int, float], ...], ...] = ()


def check_span(chain_len: int, start: int, end: int) -> None:
    """BadRequest unless 0 <= start < end <= chain_len."""
    problem = span_problem(chain_len, start, end)
    if problem is not None:
        raise BadRequest(problem)
