"""Chain facts: positions, spans, the blocks a stage holds and its content key (no torch).

A model's chain is `[embed, layer 0, ..., layer L-1, head]`: position 0 is the embedding,
`1..L` the decoder layers, `L+1` the head (docs/internals.md, "Blocks"). A stage is a span
`[start, end)` of positions. The worker, the broker and the planner all read chains through
these functions, so they agree on what a stage is.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def span_problem(chain_len: int, start: int, end: int) -> str | None:
    """What is wrong with [start, end) as a span of a `chain_len`-position chain (None: nothing)."""
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end))
    if not ints or not 0 <= start < end <= chain_len:
        return f"stage [{start}, {end}) is not a span of a {chain_len}-position chain"
    return None


def decoder_layers_in(chain_len: int, start: int, end: int) -> int:
    """How many decoder layers (positions 1..L) the span [start, end) holds."""
    return max(0, min(end, chain_len - 1) - max(start, 1))


def stage_blocks(manifest: Any, start: int, end: int) -> tuple[str, ...]:
    """Block ids a stage holds, in chain order: its positions' blocks and, under a tied head,
    the embedding block its lm_head is (listed last)."""
    chain = tuple(manifest.chain)
    blocks = chain[start:end]
    if end == len(chain) and manifest.tie_word_embeddings:
        blocks = (*blocks, chain[0])
    return blocks


def stage_key(manifest: Any, start: int, end: int) -> str:
    """Content identity of chain positions [start, end) of a model (a ModelManifest).

    sha256 over the family fingerprint, the span and the block ids (plus the embedding's id
    for a tied head, whose lm_head is that block): two models whose chains share this run of
    blocks get the same key, and their requests are batched together in the stage. Raises
    ValueError for a span the chain does not have.
    """
    chain = tuple(manifest.chain)
    problem = span_problem(len(chain), start, end)
    if problem is not None:
        raise ValueError(problem)
    fingerprint = getattr(manifest, "fingerprint", "")
    if not fingerprint:
        from blockllm.zoo.families import fingerprint as config_fingerprint

        fingerprint = config_fingerprint(manifest.config)
    blocks = list(chain[start:end])
    if end == len(chain) and manifest.tie_word_embeddings:
        blocks.append(f"tied:{chain[0]}")
    doc = {"family": fingerprint, "start": start, "end": end, "blocks": blocks}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_row_bytes(manifest: Any, dtype: str | None = None) -> int:
    """Bytes of one token's K (or V) in one decoder layer of `manifest`, served in `dtype`
    (default: as stored), as the worker's KV arena counts them (worker/kv_cache.py)."""
    c = manifest.config
    heads = int(c.get("num_attention_heads") or 1)
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or int(c.get("hidden_size") or 0) // heads)
    return kv_heads * head_dim * DTYPE_BYTES.get(dtype or manifest.dtype, 4)


def kv_refusal(stages: Any, budget_bytes: int, page_size: int) -> str | None:
    """Why a worker with this KV budget would refuse one of `stages` ((row bytes, decoder
    layers) in the order it loads them), or None when it takes them all: the first stage with
    layers sets the page (`page_size` of its tokens), each needs one page per layer next to
    the others, and no row may be larger than a page (worker/kv_cache.py, `add_stage`)."""
    half = n_pages = used = 0
    for row, layers in stages:
        if layers <= 0:
            continue
        if not half:
            half = page_size * row
            n_pages = budget_bytes // (2 * half)
        if row > half:
            return f"a KV row of {row} bytes is larger than the worker's page ({half} bytes)"
        used += layers
        if used > n_pages:
            return (
                f"{used} decoder layers need a KV page each, the budget of {budget_bytes}"
                f" bytes holds {n_pages} pages of {2 * half} bytes"
            )
    return None
