"""KV pool and page tables: byte accounting, reservations, eviction, reuse, geometry."""

from __future__ import annotations

import pytest
import torch

from blockllm.worker.errors import BadRequest, CacheFull, ErrorCode
from blockllm.worker.kv_cache import KVCacheManager, KVGeometry

GEO = KVGeometry(n_kv_heads=2, head_dim=8, dtype=torch.float32, device=torch.device("cpu"))
PAGE_BYTES = 2 * 4 * 2 * 8 * 4  # K+V x 4 tokens x 2 heads x 8 dims x 4 bytes = 512


def manager(pages: int, extra: int = 0) -> KVCacheManager:
    kv = KVCacheManager(pages * PAGE_BYTES + extra, page_size=4)
    for stage in ("s", "s1", "s2"):
        kv.add_stage(stage, GEO, n_layers=0)
    return kv


def test_page_bytes_and_pool_shape_are_exact() -> None:
    kv = manager(10, extra=PAGE_BYTES - 1)  # a partial page is not a page
    assert GEO.page_bytes(4) == PAGE_BYTES
    s = kv.stats()
    assert (s.n_pages, s.total_bytes, s.used_bytes, s.free_bytes) == (10, 10 * 512, 0, 10 * 512)
    pool = kv.pool_of("s")
    assert pool.k.shape == (10, 4, 2, 8) and pool.v.shape == (10, 4, 2, 8)
    assert pool.k.is_contiguous()  # the first geometry fills its pages exactly
    bf16 = KVGeometry(2, 8, torch.bfloat16, torch.device("cpu"))
    assert bf16.page_bytes(4) == PAGE_BYTES // 2


def test_reserve_takes_layers_times_pages_and_free_returns_them() -> None:
    kv = manager(10)
    assert kv.pages_for(n_layers=2, tokens=9) == 6  # ceil(9 / 4) pages per layer
    seq = kv.reserve("s", "r", n_layers=2, capacity=9, step=1)
    assert seq.pages.shape == (2, 3) and len(set(seq.pages.flatten().tolist())) == 6
    assert (seq.capacity, seq.length) == (9, 0)
    assert kv.stats().used_bytes == 6 * PAGE_BYTES and kv.stats().n_sequences == 1
    kv.free("s", "r")
    assert kv.stats().used_bytes == 0 and kv.get("s", "r") is None


def test_freed_pages_are_reused() -> None:
    kv = manager(8)
    a = kv.reserve("s", "a", 1, 8, step=1).pages.flatten().tolist()
    kv.reserve("s", "b", 1, 8, step=1)
    kv.free("s", "a")
    c = kv.reserve("s", "c", 1, 8, step=2).pages.flatten().tolist()
    assert sorted(c) == sorted(a)


def test_make_room_past_capacity_is_cache_full() -> None:
    kv = manager(4)
    with pytest.raises(CacheFull, match="whole pool") as e:
        kv.make_room(5, protected=set())
    assert e.value.code == ErrorCode.CACHE_FULL
    kv.reserve("s", "a", 1, 16, step=1)  # all 4 pages
    with pytest.raises(CacheFull):
        kv.make_room(1, protected={"a"})  # the only holder is protected
    assert kv.get("s", "a") is not None


def test_eviction_is_lru_by_request_across_stages_and_skips_protected() -> None:
    kv = manager(6)
    kv.reserve("s1", "old", 1, 4, step=1)
    kv.reserve("s2", "old", 1, 4, step=5)  # a request's last use is its latest stage use
    kv.reserve("s1", "mid", 1, 8, step=3)
    kv.reserve("s1", "busy", 1, 8, step=0)
    kv.make_room(2, protected={"busy"})  # 0 free: evict "mid" (last 3) before "old" (last 5)
    assert kv.get("s1", "mid") is None and kv.get("s1", "old") is not None
    kv.make_room(4, protected={"busy"})
    assert kv.get("s1", "old") is None and kv.get("s2", "old") is None  # all of its stages
    assert kv.get("s1", "busy") is not None
    assert kv.stats().free_pages == 4


def test_free_stage_and_request() -> None:
    kv = manager(8)
    for stage in ("s1", "s2"):
        for rid in ("a", "b"):
            kv.reserve(stage, rid, 1, 4, step=0)
    kv.free_stage("s1")
    assert kv.get("s1", "a") is None and kv.get("s2", "a") is not None
    kv.free_request("a")
    assert kv.get("s2", "a") is None and kv.get("s2", "b") is not None
    assert kv.stats().used_bytes == PAGE_BYTES


CPU = torch.device("cpu")


def test_geometries_share_one_budget_without_mixing_bytes() -> None:
    kv = KVCacheManager(12 * PAGE_BYTES, page_size=4)  # pages of 512 bytes (GEO: 4 tokens)
    geos = {
        "a": GEO,
        "b": KVGeometry(2, 8, torch.bfloat16, CPU),  # 8 tokens a page
        "c": KVGeometry(4, 8, torch.float32, CPU),  # 2 tokens a page
        "d": KVGeometry(3, 8, torch.float32, CPU),  # 2 tokens (192 of 256 bytes): strided
    }
    pools = {name: kv.add_stage(name, g, n_layers=1) for name, g in geos.items()}
    assert [pools[n].page_size for n in "abcd"] == [4, 8, 2, 2]
    assert pools["d"].k.shape == (12, 2, 3, 8) and not pools["d"].k.is_contiguous()
    seqs = {name: kv.reserve(name, "r" + name, 1, 8, step=1) for name in geos}
    assert [seqs[n].n_pages for n in "abcd"] == [2, 1, 4, 4]  # 11 of 12 pages, one free list
    assert kv.stats().free_pages == 1 and kv.stats().used_bytes == 11 * PAGE_BYTES
    for i, (name, seq) in enumerate(seqs.items()):  # each writes its own 8 tokens
        pool, t = pools[name], torch.arange(8)
        slots = seq.pages[0][t // pool.page_size] * pool.page_size + t % pool.page_size
        rows = torch.full((8, pool.geometry.n_kv_heads, 8), float(i + 1))
        pool.write(slots, rows.to(pool.geometry.dtype), -rows.to(pool.geometry.dtype))
        seq.length = 8
    for i, name in enumerate(seqs):  # and reads back only its own
        k, v = kv.export(name, "r" + name, 8)
        assert (k == i + 1).all() and (v == -(i + 1)).all(), name
    stats = {g.label: g for g in kv.geometry_stats()}
    assert stats["3x8/float32"].used_pages == 4 and stats["2x8/bfloat16"].n_sequences == 1
    assert stats["2x8/float32"].used_bytes == 2 * PAGE_BYTES


def test_eviction_is_lru_across_geometries_and_pages_are_zeroed_between_them() -> None:
    kv = KVCacheManager(4 * PAGE_BYTES, page_size=4)
    a = kv.add_stage("a", GEO, n_layers=1)
    b = kv.add_stage("b", KVGeometry(2, 8, torch.bfloat16, CPU), n_layers=1)
    old = kv.reserve("a", "old", 1, 8, step=1)  # 2 pages
    kv.reserve("a", "new", 1, 8, step=2)  # 2 pages: the arena is full
    a.k[old.pages[0]] = float("nan")  # bits that must never reach another dtype's reader
    a.v[old.pages[0]] = float("nan")
    kv.make_room(kv.pages_for(1, 16, "b"), protected=set())  # one bf16 page: evicts "old"
    assert kv.get("a", "old") is None and kv.get("a", "new") is not None
    seq = kv.reserve("b", "r", 1, 16, step=3)
    assert set(seq.pages.flatten().tolist()) <= set(old.pages.flatten().tolist())
    assert not b.k[seq.pages[0]].isnan().any() and not b.k[seq.pages[0]].any()


def test_a_stage_whose_minimum_does_not_fit_is_refused() -> None:
    kv = KVCacheManager(4 * PAGE_BYTES, page_size=4)
    kv.add_stage("a", GEO, n_layers=3)
    with pytest.raises(CacheFull, match="cannot hold") as e:
        kv.add_stage("b", KVGeometry(4, 8, torch.float32, CPU), n_layers=2)
    assert e.value.code == ErrorCode.CACHE_FULL
    assert [g.stages for g in kv.geometry_stats()] == [1, 0]  # nothing registered
    kv.remove_stage("a")
    kv.add_stage("b", KVGeometry(4, 8, torch.float32, CPU), n_layers=2)  # fits alone


def test_a_geometry_whose_rows_exceed_a_page_is_a_bad_request() -> None:
    kv = manager(4)  # pages of 256 bytes of K: GEO's 4 tokens of 64 bytes
    with pytest.raises(BadRequest, match="largest rows first"):
        kv.add_stage("big", KVGeometry(40, 8, torch.float32, CPU), n_layers=1)


def test_no_pool_until_a_stage_with_layers() -> None:
    kv = KVCacheManager(1 << 20)
    assert kv.stats().total_bytes == 0
    with pytest.raises(CacheFull):
        kv.make_room(1, protected=set())


def test_worker_error_codes_are_the_wire_codes() -> None:
    from blockllm.broker.protocol import ErrorCode as WireCode

    for code in ErrorCode:
        assert WireCode(code.value).value == code.value == code.name
