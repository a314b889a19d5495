"""Token sampling on the head stage: greedy, temperature, top-k, top-p, per-request seeds.

Each row of a batch is sampled with its own parameters. The random draw for the token at
absolute position `p` comes from a generator seeded from `(seed, p)` alone, so the same request
samples the same tokens whatever else is in the batch, and a replayed request (its history
re-prefilled) samples again exactly what it sampled before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from blockllm.worker.items import SamplingParams

__all__ = ["GREEDY", "SamplingParams", "position_seed", "sample"]


GREEDY = SamplingParams()


def position_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed from (request seed, absolute position); stable across runs."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]
) -> tuple[list[int], list[float]]:
    """Pick one token per row of `logits` [B, V]; return (token ids, logprob of each).

    `positions[i]` is the absolute position the new token of row i will occupy. The logprob is
    the model's own (log-softmax of the raw logits, before temperature and filtering). Rows
    are independent: a row's token depends only on its logits, params and position.
    """
    logits = logits.float()
    # logprob = logit - logsumexp: one pass over V instead of a full log_softmax
    lse = torch.logsumexp(logits, dim=-1)  # [B, V] -> [B]
    # max() gives the greedy token and its logit in one pass (argmax alone is slower on CPU);
    # ties resolve to the first index, as argmax (and HF's greedy) does
    chosen, tokens = logits.max(dim=-1)  # [B], [B]
    sampled = [row for row, p in enumerate(params) if not p.greedy]
    for row in sampled:
        tokens[row] = _draw(logits[row], params[row], positions[row])
    if sampled:
        chosen = logits.gather(1, tokens[:, None]).squeeze(1)  # [B, 1] -> [B]
    return tokens.tolist(), (chosen - lse).tolist()


def _draw(logits: torch.Tensor, p: SamplingParams, position: int) -> int:
    """Sample one token from `logits` [V] with temperature / top-k / top-p by inverse CDF."""
    scaled = logits / p.temperature  # [V]
    k = p.top_k if 0 < p.top_k < scaled.numel() else scaled.numel()
    # sorted descending; ties broken by index so the order is deterministic
    values, ids = torch.topk(scaled, k, sorted=True)  # [k], [k]
    probs = torch.softmax(values, dim=-1)  # [k]
    if p.top_p < 1.0:
        cum = torch.cumsum(probs, dim=-1)  # [k]
        # keep the smallest prefix whose mass reaches top_p: drop a token once the mass
        # strictly before it already does (the first token is always kept)
        keep = (cum - probs) < p.top_p
        probs = probs * keep
    cdf = torch.cumsum(probs, dim=-1)  # [k]
    gen = torch.Generator(device="cpu").manual_seed(position_seed(p.seed, position))
    u = torch.rand((), generator=gen).item() * cdf[-1].item()
    idx = int(torch.searchsorted(cdf.cpu(), torch.tensor([u]), right=True).item())
    return int(ids[min(idx, k - 1)].item())
