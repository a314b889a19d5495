"""A worker's messages <-> engine items: a FORWARD or SPECULATE as a `WorkItem`, a
`WorkResult` as the RESULT or ERROR that answers it, and which FORWARDs are decode steps (the
items `bench pipeline --breakdown` times). Used by the compute loop (worker/proc.py) and the
IO thread (worker/proc_io.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from blockllm.broker import frames
from blockllm.broker.protocol import Error, ErrorCode, Forward, Message, Result, Speculate
from blockllm.worker.items import SamplingParams, WorkItem
from blockllm.worker.transfer import to_host

# Engine error codes a broker answers by replaying/rerouting (the request itself is fine).
RETRYABLE = frozenset(
    {ErrorCode.KV_MISS, ErrorCode.CACHE_FULL, ErrorCode.QUEUE_FULL, ErrorCode.WORKER_LOST}
)


def is_decode(msg: Forward, x: torch.Tensor) -> bool:
    """Whether a FORWARD is a decode step (one new position after a prefill): the items
    whose phases `Timings` sums for `bench pipeline --breakdown`."""
    return msg.past_len > 0 and x.shape[0] == 1


def work_item(msg: Forward | Speculate, x: torch.Tensor) -> WorkItem:
    """The engine item of a FORWARD or SPECULATE whose input tensor `x` is on the device:
    token ids (int64) enter the embedding, anything else is hidden states. Both carry
    `top_logprobs` (a kept speculative run answers the real FORWARD with its alternatives);
    only a FORWARD carries prompt `targets` (a prefill is never speculated)."""
    is_ids = x.dtype == torch.int64
    return WorkItem(
        request_id=msg.request_id,
        step=msg.step,
        stage_keys=tuple(msg.stage_keys),
        past_len=msg.past_len,
        tokens=x if is_ids else None,
        hidden=None if is_ids else x,
        max_total_len=msg.max_total_len,
        sampling=SamplingParams(msg.temperature, msg.top_k, msg.top_p, msg.seed),
        top_logprobs=msg.top_logprobs,
        targets=tuple(msg.targets) if isinstance(msg, Forward) else (),
        adapters=_adapters(msg) if isinstance(msg, Forward) else (),
    )


def _adapters(msg: Forward) -> tuple[tuple[int, str], ...]:
    """A FORWARD's LoRA blocks as (position, block id) pairs; BadRequest when the arrays differ
    in length."""
    from blockllm.worker.errors import BadRequest

    pos, blocks = tuple(msg.adapter_positions), tuple(msg.adapter_blocks)
    if len(pos) != len(blocks):
        raise BadRequest(f"{len(pos)} adapter positions for {len(blocks)} adapter blocks")
    return tuple(zip(pos, blocks, strict=True))


def result_message(r: Any) -> tuple[Message, tuple[torch.Tensor, ...], Callable[[], None] | None]:
    """The message answering one engine `WorkResult`: ERROR, RESULT(token) or RESULT(hidden),
    the hidden state as a CPU tensor for a zero-copy frame; and what to call before its bytes
    are read (a CUDA download under way: worker/transfer.py), else None."""
    if r.error is not None:
        code = ErrorCode(getattr(r.error, "value", r.error))
        text = r.message or code.value
        error = Error(r.request_id, code.value, text, retryable=code in RETRYABLE, step=r.step)
        return error, (), None
    if r.token_id is not None:
        logprob = float(r.logprob) if r.logprob is not None else 0.0
        flat = [alt for row in r.prompt_top for alt in row]
        res = Result(
            r.request_id,
            r.step,
            int(r.token_id),
            logprob,
            top_ids=tuple(t for t, _ in r.top),
            top_logprobs=tuple(lp for _, lp in r.top),
            prompt_logprobs=tuple(r.prompt_logprobs),
            prompt_top_ids=tuple(t for t, _ in flat),
            prompt_top_logprobs=tuple(lp for _, lp in flat),
        )
        return res, (), None
    hidden, ready = to_host(r.hidden.detach())
    return Result(r.request_id, r.step, tensors=(frames.meta_of(hidden),)), (hidden,), ready
