"""Ragged paged attention against a naive per-request reference (random tensors, no model)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from blockllm.worker.attention import PagedCacheView, paged_attention, plan_step
from blockllm.worker.kv_cache import KVCacheManager, KVGeometry

H, HKV, DH, PAGE, LAYERS = 4, 2, 8, 4, 2


def reference(q, k, v, window, softcap=None):
    """q [H, n, Dh] at the last n positions of k, v [Hkv, S, Dh] -> [n, H, Dh]."""
    n, s = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(H // HKV, 0), v.repeat_interleave(H // HKV, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(DH)  # [H, n, S]
    if softcap is not None:  # Gemma 2: scores squashed into (-cap, cap)
        scores = softcap * torch.tanh(scores / softcap)
    q_pos = torch.arange(s - n, s)[:, None]
    k_pos = torch.arange(s)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)  # [H, n, Dh] -> [n, H, Dh]


RAGGED = [(9, 1), (0, 1), (4, 1), (0, 6), (7, 5), (2, 2)]  # decodes (one with no past) first
UNIFORM = [(6, 1), (6, 1), (6, 1), (3, 4)]  # equal decode lengths: sliced instead of masked


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("shapes", [RAGGED, UNIFORM], ids=["ragged", "uniform"])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("strided", [False, True], ids=["exact", "strided"])
def test_ragged_batch_matches_reference(window: int | None, shapes, softcap, strided) -> None:
    torch.manual_seed(0)
    geo = KVGeometry(HKV, DH, torch.float32, torch.device("cpu"))
    if strided:  # another geometry came first: its 288-byte K pages hold 4 of our 64-byte rows
        kv = KVCacheManager(64 * 2 * 288, page_size=1)
        kv.add_stage("first", KVGeometry(9, 8, torch.float32, torch.device("cpu")), 1)
    else:
        kv = KVCacheManager(64 * geo.page_bytes(PAGE), page_size=PAGE)
    pool = kv.add_stage("s", geo, LAYERS)
    assert pool.page_size == PAGE and pool.k.is_contiguous() != strided
    kv.arena._free.reverse()  # pages come out in a scrambled order, not 0, 1, 2, ...
    items, full_k, full_v = [], [], []
    for i, (past, n) in enumerate(shapes):
        seq = kv.reserve("s", f"r{i}", LAYERS, past + n, step=0)
        k, v = torch.randn(HKV, past + n, DH), torch.randn(HKV, past + n, DH)
        for t in range(past):  # the past is already in the pool
            page, off = seq.pages[1, t // PAGE], t % PAGE
            pool.k[page, off], pool.v[page, off] = k[:, t], v[:, t]
        items.append((seq.pages, past, n))
        full_k.append(k)
        full_v.append(v)
    batch = plan_step(pool, layer0=5, n_layers=LAYERS, items=items)
    decodes = [past for past, n in shapes if n == 1]
    assert batch.n_decode == len(decodes) and batch.positions.tolist()[: len(decodes)] == decodes
    # the new tokens of all items, flattened: [1, Hkv, N, Dh]
    new_k = torch.cat([k[:, p:] for k, (_, p, _) in zip(full_k, items, strict=True)], 1)[None]
    new_v = torch.cat([v[:, p:] for v, (_, p, _) in zip(full_v, items, strict=True)], 1)[None]
    n_total = new_k.shape[2]
    q = torch.randn(1, H, n_total, DH)
    module = SimpleNamespace(layer_idx=6, num_key_value_groups=H // HKV)  # local layer 1
    k_out, v_out = PagedCacheView(batch).update(new_k, new_v, 6)
    assert k_out is new_k and v_out is new_v
    out, _ = paged_attention(
        module,
        q,
        new_k,
        new_v,
        None,
        scaling=DH**-0.5,
        sliding_window=window,
        softcap=softcap,
        blockllm_step=batch,
    )
    assert out.shape == (1, n_total, H, DH)
    row = 0
    for (_past, n), k, v in zip(shapes, full_k, full_v, strict=True):
        want = reference(q[0, :, row : row + n], k, v, window, softcap)
        torch.testing.assert_close(out[0, row : row + n], want, rtol=1e-5, atol=1e-5)
        row += n
    # update() wrote every new token of layer 1 into its page, and nothing into layer 0's
    last, (past, n) = len(shapes) - 1, shapes[-1]
    seq = kv.get("s", f"r{last}")
    t = past + n - 1
    assert torch.equal(pool.k[seq.pages[1, t // PAGE], t % PAGE], full_k[last][:, t])
    assert not pool.k[seq.pages[0]].any()


def test_single_prefill_and_decode_only_fast_paths() -> None:
    torch.manual_seed(1)
    geo = KVGeometry(HKV, DH, torch.float32, torch.device("cpu"))
    kv = KVCacheManager(16 * geo.page_bytes(PAGE), page_size=PAGE)
    pool = kv.add_stage("s", geo, 1)
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=H // HKV)
    seq = kv.reserve("s", "r", 1, 8, step=0)
    k, v, q = torch.randn(HKV, 6, DH), torch.randn(HKV, 6, DH), torch.randn(1, H, 6, DH)
    batch = plan_step(pool, 0, 1, [(seq.pages, 0, 5)])  # prefill 5 tokens
    PagedCacheView(batch).update(k[None, :, :5], v[None, :, :5], 0)
    out, _ = paged_attention(
        module, q[:, :, :5], k[None, :, :5], v[None, :, :5], None, blockllm_step=batch
    )
    torch.testing.assert_close(out[0], reference(q[0, :, :5], k[:, :5], v[:, :5], None))
    batch = plan_step(pool, 0, 1, [(seq.pages, 5, 1)])  # then decode the 6th
    PagedCacheView(batch).update(k[None, :, 5:], v[None, :, 5:], 0)
    out, _ = paged_attention(
        module, q[:, :, 5:], k[None, :, 5:], v[None, :, 5:], None, blockllm_step=batch
    )
    torch.testing.assert_close(out[0], reference(q[0, :, 5:], k, v, None))


def test_bf16_decode_rows_get_the_same_bits_alone_and_batched() -> None:
    """In bf16 a masked sdpa over padded pages rounds differently from sdpa over a row's
    exact keys: rows of different lengths are attended per length, so each row's output is
    bit-identical to its output alone (a batch never changes a request's tokens)."""
    torch.manual_seed(2)
    geo = KVGeometry(HKV, DH, torch.bfloat16, torch.device("cpu"))
    kv = KVCacheManager(64 * geo.page_bytes(PAGE), page_size=PAGE)
    pool = kv.add_stage("s", geo, 1)
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=H // HKV)
    lens = [3, 9, 6, 9]  # past lengths of 4 decode rows
    seqs = []
    for i, past in enumerate(lens):
        seq = kv.reserve("s", f"r{i}", 1, past + 1, step=0)
        for t in range(past):
            page, off = seq.pages[0, t // PAGE], t % PAGE
            pool.k[page, off] = torch.randn(HKV, DH).to(torch.bfloat16)
            pool.v[page, off] = torch.randn(HKV, DH).to(torch.bfloat16)
        seqs.append(seq)
    q = torch.randn(1, H, len(lens), DH).to(torch.bfloat16)
    k_new = torch.randn(1, HKV, len(lens), DH).to(torch.bfloat16)
    v_new = torch.randn(1, HKV, len(lens), DH).to(torch.bfloat16)

    def attend(rows: list[int]) -> torch.Tensor:
        batch = plan_step(pool, 0, 1, [(seqs[i].pages, lens[i], 1) for i in rows])
        at = torch.tensor(rows)
        PagedCacheView(batch).update(k_new[:, :, at], v_new[:, :, at], 0)
        out, _ = paged_attention(
            module, q[:, :, at], k_new[:, :, at], v_new[:, :, at], None, blockllm_step=batch
        )
        return out[0]  # [rows, H, Dh]

    together = attend([0, 1, 2, 3])
    for i in range(len(lens)):
        assert torch.equal(together[i], attend([i])[0]), i
