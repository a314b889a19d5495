"""Ragged batched attention over the paged KV pool, plugged into HF decoder layers.

A stage runs all new tokens of a step flattened as ONE sequence `[1, N, D]` through each HF
decoder layer, so projections and MLPs see no padding. Two hooks make the HF layer paged and
ragged without subclassing it:
- `PagedCacheView` is passed as `past_key_values`: the layer calls its `update(k, v,
  layer_idx)`, which writes the new keys/values into the request's pages.
- `paged_attention` is registered with transformers' AttentionInterface as "blockllm" (the
  config of our layers says `_attn_implementation = "blockllm"`); it receives q and the step's
  `StepBatch` through the layer's **kwargs and computes each request's attention against its
  own keys only: all single-token rows in one padded sdpa call, each prefill on its own.
  Whatever the HF attention module passes is honoured: `scaling` (Gemma's
  query_pre_attn_scalar, Granite's attention_multiplier), `sliding_window` (per layer type),
  and `softcap` (Gemma 2: scores capped with tanh, computed as HF's eager attention does).
All index tensors and masks are built once per stage step (`StepBatch`), not per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from blockllm.worker.kv_cache import KVPool

ATTN_IMPLEMENTATION = "blockllm"
STEP_KWARG = "blockllm_step"


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Q, K] bool: causal (key at or before the query), within `window` if one is set.

    HF's sliding window: query q sees key k iff q - window < k <= q.
    """
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


@dataclass(slots=True)
class PrefillSpan:
    """One multi-token item in the flattened batch: rows [offset, offset + n) of N."""

    offset: int
    n: int
    past: int
    gather: torch.Tensor | None  # [L, pages] page ids when past > 0 (keys come from the pool)
    page_size: int
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    def mask(self, window: int | None, device: torch.device) -> torch.Tensor | None:
        """[1, 1, n, S] bool (True = attend), or None when plain causal attention is exact."""
        if window is not None and window >= self.past + self.n:
            window = None  # the window covers the whole sequence: no effect
        if window is None and self.gather is None:
            return None
        if window not in self._masks:
            s = self.n if self.gather is None else self.gather.shape[1] * self.page_size
            q_pos = torch.arange(self.past, self.past + self.n, device=device)  # [n]
            k_pos = torch.arange(s, device=device)  # [S]
            # keys at positions >= past + n are unwritten page slots: causality hides them
            self._masks[window] = _visible(q_pos, k_pos, window)[None, None]  # [1, 1, n, S]
        return self._masks[window]


@dataclass(slots=True)
class StepBatch:
    """Per-step metadata of one stage, shared by all of its layers."""

    pool: KVPool
    layer0: int  # HF layer index of the stage's first layer
    write_idx: torch.Tensor  # [L, N] flat pool slot (page * page_size + offset) per new token
    n_decode: int  # rows [0, n_decode) are single-token items
    dec_gather: torch.Tensor | None  # [L, n_decode * Pmax] page ids (padded)
    dec_lens: torch.Tensor | None  # [n_decode] keys per decode row (past + 1)
    dec_uniform: int  # the common length of all decode rows, or 0 if they differ
    dec_lens_list: list[int]  # dec_lens as Python ints
    prefills: list[PrefillSpan]
    positions: torch.Tensor  # [N] absolute position of each new token
    _dec_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def dec_keys(self, window: int | None) -> tuple[int, int, torch.Tensor | None]:
        """(lo, hi, mask): decode rows attend to gathered keys [lo, hi) under `mask`.

        When every row has the same length, slicing replaces the mask (faster kernels).
        """
        if self.dec_uniform:
            hi = self.dec_uniform
            lo = max(0, hi - window) if window is not None else 0
            return lo, hi, None
        mask = self.dec_mask(window)
        return 0, mask.shape[-1], mask

    def dec_mask(self, window: int | None) -> torch.Tensor:
        """[n_decode, 1, 1, S] bool: key j is visible to row b (built once per window size)."""
        mask = self._dec_masks.get(window)
        if mask is None:
            assert self.dec_gather is not None and self.dec_lens is not None
            s = self.dec_gather.shape[1] // self.n_decode * self.pool.page_size
            keys = torch.arange(s, device=self.dec_lens.device)  # [S]
            mask = keys[None, :] < self.dec_lens[:, None]  # [B, S]
            if window is not None:  # the query of row b sits at position dec_lens[b] - 1
                mask &= keys[None, :] > (self.dec_lens[:, None] - 1 - window)
            mask = mask[:, None, None, :]  # [B, S] -> [B, 1, 1, S]
            self._dec_masks[window] = mask
        return mask


class PagedCacheView:
    """The `past_key_values` our HF layers see: `update` writes new K/V into the pool."""

    def __init__(self, batch: StepBatch) -> None:
        self.batch = batch

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kw
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch
        slots = b.write_idx[layer_idx - b.layer0]  # [N]
        # k: [1, Hkv, N, Dh] -> [N, Hkv, Dh], into the pool's [pages, page, Hkv, Dh] slots
        b.pool.write(slots, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
        return key_states, value_states


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    softcap: float | None,
    causal: bool = False,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over [..., heads, rows, Dh]; k/v may have fewer heads (GQA).

    With `softcap` (Gemma 2), HF's eager math: scores / cap, tanh, * cap, then the mask and a
    float32 softmax; sdpa has no soft-cap."""
    if softcap is None:
        gqa = q.shape[-3] != k.shape[-3]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
        )
    if q.shape[-3] != k.shape[-3]:  # [.., Hkv, S, Dh] -> [.., H, S, Dh]
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [.., H, n, S]
    scores = scores / softcap
    scores = torch.tanh(scores)
    scores = scores * softcap
    if causal:  # no past: query i sees keys 0..i
        n, s = scores.shape[-2], scores.shape[-1]
        mask = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(s - n)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def _gather(pool: torch.Tensor, pages: torch.Tensor, rows: int) -> torch.Tensor:
    """Keys/values of `rows` requests from their pages: [rows, Hkv, S, Dh] (one copy)."""
    got = pool.index_select(0, pages)  # [rows * P, page, Hkv, Dh]
    # [rows * P, page, Hkv, Dh] -> [rows, P * page, Hkv, Dh] -> [rows, Hkv, S, Dh] (a view)
    return got.view(rows, -1, got.shape[2], got.shape[3]).transpose(1, 2)


def _decode(
    q: torch.Tensor,
    b: StepBatch,
    local: int,
    window: int | None,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """All single-token rows in one sdpa call: returns [n_decode, H, Dh]."""
    assert b.dec_gather is not None
    pages = b.dec_gather[local]  # [nd * Pmax]
    nd = b.n_decode
    k = _gather(b.pool.k, pages, nd)  # [nd, Hkv, S, Dh]
    v = _gather(b.pool.v, pages, nd)
    n_rep = q.shape[1] // k.shape[1]  # query heads per KV head
    # q: [1, H, N, Dh] -> [H, nd, Dh] -> [nd, H, Dh] -> [nd, Hkv, n_rep, Dh] (GQA as rows,
    # as HF's pack_gqa: the n_rep query heads of a KV head attend as n_rep query rows)
    qd = q[0, :, :nd].transpose(0, 1).reshape(nd, k.shape[1], n_rep, q.shape[-1])
    lo, hi, mask = b.dec_keys(window)
    if mask is not None and k.dtype != torch.float32:
        return _decode_by_length(qd, k, v, b, window, scaling, softcap)
    if hi - lo != k.shape[2]:
        k, v = k[:, :, lo:hi], v[:, :, lo:hi]  # [nd, Hkv, S, Dh] -> [nd, Hkv, hi - lo, Dh]
    out = _attend(qd, k, v, mask, scaling, softcap)
    return out.reshape(nd, -1, q.shape[-1])  # [nd, Hkv, n_rep, Dh] -> [nd, H, Dh]


def _decode_by_length(
    qd: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    b: StepBatch,
    window: int | None,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """Decode rows of different lengths in bf16/fp16: one unmasked call per length, keys
    sliced to it. sdpa under a padding mask rounds differently from sdpa over exactly the
    keys, so one masked call would make a row's bits (and, a few tokens later, its greedy
    choice) depend on its batch; per length, a row gets what it gets alone (and what HF
    computes). Returns [n_decode, H, Dh]."""
    nd = qd.shape[0]
    out = qd.new_empty(qd.shape)  # [nd, Hkv, n_rep, Dh]
    rows: dict[int, list[int]] = {}
    for i, n in enumerate(b.dec_lens_list):
        rows.setdefault(n, []).append(i)
    for n, idx in rows.items():
        lo = max(0, n - window) if window is not None else 0
        at = torch.tensor(idx, device=qd.device)
        ks, vs = k[at, :, lo:n], v[at, :, lo:n]  # [g, Hkv, n - lo, Dh]
        out[at] = _attend(qd[at], ks, vs, None, scaling, softcap)
    return out.reshape(nd, -1, qd.shape[-1])


def _prefill(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    b: StepBatch,
    span: PrefillSpan,
    local: int,
    window: int | None,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """One multi-token item: returns [1, H, n, Dh]."""
    o, n = span.offset, span.n
    qs = q[:, :, o : o + n]  # [1, H, n, Dh]
    if span.gather is None:
        k = k_new[:, :, o : o + n]  # [1, Hkv, n, Dh]: the item's keys are all new
        v = v_new[:, :, o : o + n]
    else:
        k = _gather(b.pool.k, span.gather[local], 1)  # [1, Hkv, S, Dh]
        v = _gather(b.pool.v, span.gather[local], 1)
    mask = span.mask(window, q.device)
    return _attend(qs, k, v, mask, scaling, softcap, causal=mask is None)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The "blockllm" attention: q [1, H, N, Dh] -> out [1, N, H, Dh] (HF's convention)."""
    b: StepBatch = kwargs[STEP_KWARG]
    local = module.layer_idx - b.layer0
    win, cap = sliding_window, softcap
    if b.n_decode == query.shape[2]:  # decode-only step: no output buffer to assemble
        out = _decode(query, b, local, win, scaling, cap)
        return out[None], None  # [nd, H, Dh] -> [1, N, H, Dh]
    if b.n_decode == 0 and len(b.prefills) == 1:
        out = _prefill(query, key, value, b, b.prefills[0], local, win, scaling, cap)
        return out.transpose(1, 2), None  # [1, H, N, Dh] -> [1, N, H, Dh]
    n, h, dh = query.shape[2], query.shape[1], query.shape[3]
    out = query.new_empty(1, n, h, dh)  # [1, N, H, Dh]
    if b.n_decode:
        out[0, : b.n_decode] = _decode(query, b, local, win, scaling, cap)
    for span in b.prefills:
        res = _prefill(query, key, value, b, span, local, win, scaling, cap)
        # res: [1, H, n, Dh] -> [1, n, H, Dh], rows [offset, offset + n) of the batch
        out[:, span.offset : span.offset + span.n] = res.transpose(1, 2)
    return out, None


def plan_step(
    pool: KVPool, layer0: int, n_layers: int, items: list[tuple[torch.Tensor, int, int]]
) -> StepBatch:
    """Index tensors and masks of one stage step, shared by all its layers.

    `items` are (page table [L, P], past_len, n_new) in batch order: single-token items
    first. Their new tokens are the rows of the flattened batch in that order.
    """
    page = pool.page_size
    device = pool.k.device
    positions, writes, prefills = [], [], []
    dec_pages: list[torch.Tensor] = []
    dec_lens: list[int] = []
    offset = 0
    for pages, past, n in items:
        pos = torch.arange(past, past + n, device=device)  # [n]
        positions.append(pos)
        writes.append(pages[:, pos // page] * page + pos % page)  # [L, n] flat slots
        used = -(-(past + n) // page)  # pages holding keys 0 .. past + n - 1
        if n == 1:
            assert not prefills, "single-token items come first"
            dec_pages.append(pages[:, :used])
            dec_lens.append(past + 1)
        else:
            gather = pages[:, :used] if past > 0 else None
            prefills.append(PrefillSpan(offset, n, past, gather, page))
        offset += n
    dec_gather = None
    if dec_pages:
        p_max = max(t.shape[1] for t in dec_pages)
        # padding pages repeat the row's first page: read, then masked out by dec_mask (a
        # page of the row's own geometry: never another dtype's bits read as NaN)
        table = torch.empty(n_layers, len(dec_pages), p_max, dtype=torch.int64, device=device)
        for i, t in enumerate(dec_pages):
            table[:, i, : t.shape[1]] = t
            table[:, i, t.shape[1] :] = t[:, :1]
        dec_gather = table.view(n_layers, -1)  # [L, nd, Pmax] -> [L, nd * Pmax]
    return StepBatch(
        pool=pool,
        layer0=layer0,
        write_idx=torch.cat(writes, dim=1),  # [L, N]
        n_decode=len(dec_lens),
        dec_gather=dec_gather,
        dec_lens=torch.tensor(dec_lens, device=device) if dec_lens else None,
        dec_uniform=dec_lens[0] if dec_lens and len(set(dec_lens)) == 1 else 0,
        dec_lens_list=dec_lens,
        prefills=prefills,
        positions=torch.cat(positions),  # [N]
    )


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
