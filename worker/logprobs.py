"""Log-probabilities the head stage returns besides the sampled token (the OpenAI API's
`logprobs` / `top_logprobs`, and `echo` with prompt log-probabilities for evaluation harnesses).

All of it is the model's own distribution: log-softmax of the raw logits, before temperature and
filtering, as for the sampled token's logprob (`sampling.sample`). It is computed in the same
step as the sample, from the hidden states of the batched forward that just ran (no second
pass): the chosen rows' top-k alternatives from the logits already computed for sampling, and
for an item that asks for its prompt's log-probabilities (`WorkItem.targets`: the prompt's
tokens 1..T-1), the head over its other positions too, in chunks of `CHUNK_ROWS` so that a long
prompt never materializes a [T, V] float tensor at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from blockllm.broker.protocol import MAX_PROMPT_TOP, MAX_TOP_LOGPROBS
from blockllm.worker.errors import BadRequest

# Most alternatives per position a request may ask for (OpenAI's chat limit), and with prompt
# log-probabilities (OpenAI's completions limit): the wire's limits, broker/protocol/.
CHUNK_ROWS = 256

TopK = tuple[tuple[int, float], ...]


def top_alternatives(logits: torch.Tensor, ks: Sequence[int]) -> list[TopK]:
    """Per row of `logits` [B, V], the `ks[row]` most likely (token id, logprob) pairs,
    most likely first (ties: lower id first); `()` where ks[row] is 0."""
    k_max = max(ks, default=0)
    if k_max <= 0:
        return [() for _ in ks]
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, V] -> [B, 1]
    values, ids = torch.topk(logits, min(k_max, logits.shape[-1]), dim=-1)  # [B, k]
    lps = (values - lse).tolist()
    id_rows = ids.tolist()
    return [
        tuple(zip(id_rows[r][:k], lps[r][:k], strict=True)) if k > 0 else ()
        for r, k in enumerate(ks)
    ]


def prompt_logprobs(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: Sequence[int],
    k: int,
) -> tuple[tuple[float, ...], tuple[TopK, ...]]:
    """Log-probabilities of `targets[i]` at row i of `hidden` [R, D] (R >= len(targets)), and
    each row's top-`k` alternatives. `logits_fn` is the head (final norm + lm_head)."""
    n = len(targets)
    lps: list[float] = []
    tops: list[TopK] = []
    want = torch.tensor(list(targets), dtype=torch.int64, device=hidden.device)  # [n]
    for a in range(0, n, CHUNK_ROWS):
        b = min(n, a + CHUNK_ROWS)
        logits = logits_fn(hidden[a:b]).float()  # [r, D] -> [r, V]
        lse = torch.logsumexp(logits, dim=-1)  # [r]
        chosen = logits.gather(1, want[a:b, None]).squeeze(1)  # [r, 1] -> [r]
        lps.extend((chosen - lse).tolist())
        tops.extend(top_alternatives(logits, [k] * (b - a)))
    return tuple(lps), tuple(tops)


def check_logprobs(item: Any, n: int, vocab_size: int) -> None:
    """BadRequest unless the item's logprob fields are sane for its `n` new positions."""
    k, targets = item.top_logprobs, item.targets
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {k!r}")
    if not targets:
        return
    if item.past_len != 0 or len(targets) > n - 1:
        raise BadRequest(
            f"{len(targets)} prompt targets need a prefill (past_len 0) of more than that many "
            f"tokens (got past_len {item.past_len}, {n} tokens)"
        )
    if k > MAX_PROMPT_TOP:
        raise BadRequest(f"top_logprobs with prompt logprobs must be <= {MAX_PROMPT_TOP}")
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in targets):
        raise BadRequest(f"prompt targets must be token ids in [0, {vocab_size})")
