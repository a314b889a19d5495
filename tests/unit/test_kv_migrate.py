"""KV migration in the paged pool: export of one request's stage KV and import into another
pool are byte-exact, admit like a new request (reserve, evict idle, CACHE_FULL), and refuse
what does not fit the pool's geometry."""

from __future__ import annotations

import pytest
import torch

from blockllm.worker.errors import BadRequest, CacheFull, KVMiss
from blockllm.worker.kv_cache import KVCacheManager, KVGeometry

GEO = KVGeometry(n_kv_heads=2, head_dim=8, dtype=torch.bfloat16, device=torch.device("cpu"))
PAGE_BYTES = GEO.page_bytes(4)


def manager(pages: int) -> KVCacheManager:
    kv = KVCacheManager(pages * PAGE_BYTES, page_size=4)
    for stage in ("s", "other"):
        kv.add_stage(stage, GEO, n_layers=0)
    return kv


def filled(kv: KVCacheManager, rid: str, n_layers: int, length: int, capacity: int, seed: int):
    """Reserve and write random K/V at positions [0, length) through the page table."""
    seq = kv.reserve("s", rid, n_layers, capacity, step=1)
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n_layers, length, 2, 8, generator=gen).to(GEO.dtype)
    v = torch.randn(n_layers, length, 2, 8, generator=gen).to(GEO.dtype)
    for layer in range(n_layers):
        for t in range(length):
            page = int(seq.pages[layer, t // 4])
            seq.pool.k[page, t % 4] = k[layer, t]
            seq.pool.v[page, t % 4] = v[layer, t]
    seq.length = length
    return k, v


@pytest.mark.parametrize("length", [1, 4, 7, 9])
def test_export_then_import_is_byte_exact(length: int) -> None:
    src, dst = manager(20), manager(20)
    dst.reserve("other", "x", 1, 5, step=1)  # the target's pages are not the source's
    k, v = filled(src, "r", n_layers=2, length=length, capacity=12, seed=length)
    ek, ev = src.export("s", "r", length)
    assert ek.shape == (2, length, 2, 8) and ek.dtype == torch.bfloat16
    assert torch.equal(ek.view(torch.uint16), k.view(torch.uint16))
    assert torch.equal(ev.view(torch.uint16), v.view(torch.uint16))
    seq = dst.import_("s", "r", ek, ev, capacity=12, step=3, protected=set())
    assert (seq.length, seq.capacity, seq.pages.shape) == (length, 12, (2, 3))
    bk, bv = dst.export("s", "r", length)
    assert torch.equal(bk.view(torch.uint16), k.view(torch.uint16))
    assert torch.equal(bv.view(torch.uint16), v.view(torch.uint16))
    # the source keeps its copy until it is released
    assert src.get("s", "r") is not None


def test_export_of_a_length_not_held_is_a_kv_miss() -> None:
    kv = manager(10)
    filled(kv, "r", 1, 5, 8, seed=0)
    with pytest.raises(KVMiss):
        kv.export("s", "r", 4)
    with pytest.raises(KVMiss):
        kv.export("s", "nobody", 5)


def test_import_admits_like_a_new_request_and_refuses_cache_full() -> None:
    src = manager(20)
    k, v = filled(src, "r", 2, 6, 8, seed=1)
    dst = manager(4)
    dst.reserve("s", "idle", 1, 8, step=1)  # 2 pages, evictable
    dst.import_("s", "r", k, v, capacity=8, step=2, protected=set())  # needs 4: evicts idle
    assert dst.get("s", "idle") is None and dst.get("s", "r").length == 6
    other = manager(4)
    other.reserve("s", "busy", 1, 8, step=1)
    with pytest.raises(CacheFull):
        other.import_("s", "r", k, v, capacity=8, step=2, protected={"busy"})
    assert other.get("s", "r") is None and other.get("s", "busy") is not None


def test_import_refuses_wrong_geometry_or_capacity() -> None:
    dst = manager(20)
    good = torch.zeros(2, 3, 2, 8, dtype=GEO.dtype)
    with pytest.raises(BadRequest):
        dst.import_("s", "r", good.float(), good.float(), 8, 1, set())
    with pytest.raises(BadRequest):
        dst.import_("s", "r", torch.zeros(2, 3, 1, 8, dtype=GEO.dtype), good, 8, 1, set())
    with pytest.raises(BadRequest):
        dst.import_("s", "r", good, good, 2, 1, set())  # 3 tokens do not fit 2 reserved
    assert dst.stats().used_bytes == 0


class _IO:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, msg, tensors=()) -> None:
        self.sent.append((msg, tensors))


class _Proc:
    """What WorkerProc's KV handlers use of it: engine, io, stop flag, known requests."""

    def __init__(self, engine) -> None:
        self.engine, self.io, self.stop_requested, self._known = engine, _IO(), False, set()


class _Engine:
    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv

    def export_kv(self, rid, key, length):
        return self.kv.export(key, rid, length)

    def import_kv(self, rid, key, k, v, max_total_len):
        self.kv.import_(key, rid, k, v, max_total_len, 1, set())


def test_worker_handlers_answer_a_shard_an_ack_or_a_typed_refusal() -> None:
    from blockllm.broker.protocol import KvAck, KvExport, KvShard
    from blockllm.worker.proc import WorkerProc

    handle_kv_export, handle_kv_shard = WorkerProc._handle_kv_export, WorkerProc._handle_kv_shard

    src, dst = _Proc(_Engine(manager(20))), _Proc(_Engine(manager(4)))
    k, _v = filled(src.engine.kv, "r", 2, 6, 8, seed=2)
    handle_kv_export(src, KvExport(7, "r", "s", 5), [])  # holds 6 tokens, not 5
    assert src.io.sent[-1][0] == KvAck(7, "r", "s", False, "KV_MISS", src.io.sent[-1][0].message)
    handle_kv_export(src, KvExport(8, "r", "s", 6), [])
    shard, tensors = src.io.sent[-1]
    assert isinstance(shard, KvShard) and shard.length == 6 and len(shard.tensors) == 2
    assert torch.equal(tensors[0].view(torch.uint16), k.view(torch.uint16))
    handle_kv_shard(dst, KvShard(8, "r", "s", 6, 8, shard.tensors), list(tensors))
    assert dst.io.sent[-1][0] == KvAck(8, "r", "s", True) and "r" in dst._known
    handle_kv_shard(dst, KvShard(9, "q", "s", 6, 64, shard.tensors), list(tensors))
    ack = dst.io.sent[-1][0]
    assert (ack.ok, ack.code) == (False, "CACHE_FULL") and "q" not in dst._known
