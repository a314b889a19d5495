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
    kv.ensure_pool(GEO)
    return kv


def test_page_bytes_and_pool_shape_are_exact() -> None:
    kv = manager(10, extra=PAGE_BYTES - 1)  # a partial page is not a page
    assert GEO.page_bytes(4) == PAGE_BYTES
    s = kv.stats()
    assert (s.n_pages, s.total_bytes, s.used_bytes, s.free_bytes) == (10, 10 * 512, 0, 10 * 512)
    assert kv.pool.k.shape == (10, 4, 2, 8) and kv.pool.v.shape == (10, 4, 2, 8)
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


def test_one_geometry_per_pool() -> None:
    kv = manager(4)
    other = KVGeometry(4, 8, torch.float32, torch.device("cpu"))
    with pytest.raises(BadRequest, match="one model family"):
        kv.ensure_pool(other)
    assert kv.ensure_pool(GEO) is kv.pool


def test_no_pool_until_a_stage_with_layers() -> None:
    kv = KVCacheManager(1 << 20)
    assert kv.stats().total_bytes == 0
    with pytest.raises(CacheFull):
        kv.make_room(1, protected=set())


def test_worker_error_codes_are_the_wire_codes() -> None:
    from blockllm.broker.protocol import ErrorCode as WireCode

    for code in ErrorCode:
        assert WireCode(code.value).value == code.value == code.name
