"""The worker's KV-cache shard: one byte budget, paged, shared by every KV geometry it serves.

The budget is ONE preallocated byte arena of `n_units` equal pages (`KVArena`), allocated when
the first stage with decoder layers loads. A page holds the K and the V of `page_size` tokens of
ONE decoder layer of one request. Each KV geometry (kv heads, head dim, dtype) the worker's
stages need gets a view of the same arena (`KVPool`: K and V `[n_units, tokens, heads, dim]`),
created on demand: a page's byte size is fixed by the first geometry (`page_size` tokens of it),
and every other geometry fits as many of its own tokens in a page as the page holds. So all
stages of all families draw pages from one free list: no split of the budget is decided in
advance, eviction is LRU across every geometry, and a freed page serves whichever needs it next
(zeroed when it changes geometry: bits of one dtype must never be read as another's NaN).

A request's state in a stage is a page table `[n_layers, pages_per_layer]` reserved up front
for its `max_total_len`; admission fails with CacheFull rather than running out mid-way. Idle
requests may be evicted (least recently used first, never a protected one); the next item of an
evicted request then gets KV_MISS. A stage is refused (CacheFull) when the arena cannot hold
one page per layer of it next to the same minimum of every other stage the worker hosts.

Sliding windows are applied by masking (worker/attention.py): every layer keeps full-length
KV, so a window does not change a geometry's page layout.

Single-threaded: only the compute thread touches the pool (docs/internals.md, Engine API).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from blockllm.worker.errors import BadRequest, CacheFull, KVMiss

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 16


@dataclass(frozen=True, slots=True)
class KVGeometry:
    """What one token's KV looks like in one layer: its heads, head size, dtype and device."""

    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's K (or V) in one layer."""
        return self.n_kv_heads * self.head_dim * self.itemsize

    def page_bytes(self, page_size: int) -> int:
        """Bytes of one page of K plus its page of V."""
        return 2 * page_size * self.row_bytes

    @property
    def label(self) -> str:
        """`<kv heads>x<head dim>/<dtype>`, how status and metrics name it."""
        return f"{self.n_kv_heads}x{self.head_dim}/{str(self.dtype).removeprefix('torch.')}"


@dataclass(frozen=True, slots=True)
class KVStats:
    """Byte accounting of the arena (all zero before the first stage with layers loads)."""

    total_bytes: int
    used_bytes: int
    free_bytes: int
    page_bytes: int
    page_size: int
    n_pages: int
    free_pages: int
    n_sequences: int


@dataclass(frozen=True, slots=True)
class GeometryStats:
    """One geometry's share of the arena now (status, metrics)."""

    label: str
    page_size: int  # its tokens per page
    used_pages: int
    used_bytes: int
    n_sequences: int
    stages: int
    page_bytes: int  # what one page costs (the arena's page, the same for every geometry)


class KVArena(nn.Module):
    """The preallocated bytes: K halves and V halves of `n_units` pages, plus a free list."""

    def __init__(self, unit_bytes: int, n_units: int, device: torch.device) -> None:
        super().__init__()
        assert unit_bytes % 2 == 0, "a page is a K half and a V half"
        self.unit_bytes = unit_bytes
        self.n_units = n_units
        # zeros, not empty: padded gathers read unused slots (masked out, but never NaN)
        buf = torch.zeros((2, n_units, unit_bytes // 2), dtype=torch.uint8, device=device)
        self.register_buffer("buf", buf, persistent=False)
        # a stack: the most recently freed pages are reused first (warm in cache)
        self._free: list[int] = list(range(n_units - 1, -1, -1))
        self._geometry: list[KVGeometry | None] = [None] * n_units  # last written as

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def alloc(self, n: int, geometry: KVGeometry) -> list[int]:
        """Take `n` pages for `geometry`; the caller has checked `free_pages` (invariant).
        A page last used by another geometry is zeroed first."""
        assert n <= len(self._free), "alloc past the free list"
        taken = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        stale = [i for i in taken if self._geometry[i] not in (None, geometry)]
        if stale:
            self.buf[:, torch.tensor(stale, device=self.buf.device)] = 0
        for i in taken:
            self._geometry[i] = geometry
        return taken

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


class KVPool:
    """One geometry's view of the arena: K and V `[n_pages, page_size, heads, dim]` over the
    same pages as every other view, `page_size` being this geometry's tokens per page."""

    def __init__(self, arena: KVArena, geometry: KVGeometry) -> None:
        self.arena = arena
        self.geometry = geometry
        half = arena.unit_bytes // 2
        self.page_size = half // geometry.row_bytes
        if self.page_size < 1 or half % geometry.itemsize:
            raise BadRequest(
                f"KV geometry {geometry.label} ({geometry.row_bytes} bytes a token) does not fit"
                f" this worker's KV page of {half} bytes (set by the first geometry it loaded):"
                " load the stage with the largest rows first, or host this family elsewhere"
            )
        self.page_bytes = arena.unit_bytes  # what a page costs, whatever fills it
        g = geometry
        used = self.page_size * g.row_bytes
        # [2, n, half] bytes -> [2, n, used] -> dtype -> [2, n, page_size, H, Dh]; contiguous
        # when the page is filled exactly (the first geometry), else strided (write() copes)
        view = arena.buf[:, :, :used].view(g.dtype)
        view = view.view(2, arena.n_units, self.page_size, g.n_kv_heads, g.head_dim)
        self.k, self.v = view[0], view[1]
        self.n_pages = arena.n_units

    @property
    def free_pages(self) -> int:
        return self.arena.free_pages

    def alloc(self, n: int) -> list[int]:
        return self.arena.alloc(n, self.geometry)

    def free(self, pages: list[int]) -> None:
        self.arena.free(pages)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """K and V `[N, H, Dh]` of N new tokens into flat slots (page * page_size + offset)."""
        if self.k.is_contiguous():
            h, d = self.geometry.n_kv_heads, self.geometry.head_dim
            self.k.view(-1, h, d).index_copy_(0, slots, k)
            self.v.view(-1, h, d).index_copy_(0, slots, v)
            return
        at = (slots // self.page_size, slots % self.page_size)
        self.k.index_put_(at, k)
        self.v.index_put_(at, v)


class SeqKV:
    """One request's KV in one stage: its page table, filled length and last use."""

    __slots__ = ("capacity", "last_used", "length", "pages", "pool", "request_id", "stage_key")

    def __init__(
        self,
        stage_key: str,
        request_id: str,
        pages: torch.Tensor,
        capacity: int,
        step: int,
        pool: KVPool,
    ) -> None:
        self.stage_key = stage_key
        self.request_id = request_id
        self.pages = pages  # [n_layers, pages_per_layer] int64 page ids (on the pool's device)
        self.capacity = capacity  # tokens reserved
        self.length = 0  # tokens written
        self.last_used = step
        self.pool = pool

    @property
    def n_pages(self) -> int:
        return self.pages.numel()


class KVCacheManager:
    """All KV state of a worker: the arena, a view per geometry, page tables per (stage,
    request), eviction across all of them.

    Raises CacheFull when a reservation does not fit even after evicting idle requests, or a
    stage's minimum does not fit the arena next to the others; BadRequest when a geometry
    cannot share the arena (another device, rows larger than a page).
    """

    def __init__(self, budget_bytes: int, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        if budget_bytes < 0 or page_size <= 0:
            raise ValueError("kv budget must be >= 0 and page_size > 0")
        self.budget_bytes = budget_bytes
        self.page_size = page_size
        self.arena: KVArena | None = None
        self.pools: dict[KVGeometry, KVPool] = {}
        self._stages: dict[str, tuple[KVPool, int]] = {}  # stage key -> (pool, n_layers)
        self._seqs: dict[tuple[str, str], SeqKV] = {}

    def ensure_pool(self, geometry: KVGeometry) -> KVPool:
        """The geometry's view; the arena is allocated with the first one (whose `page_size`
        tokens make a page). Raises BadRequest (another device, rows larger than a page)."""
        if self.arena is None:
            unit = geometry.page_bytes(self.page_size)
            self.arena = KVArena(unit, self.budget_bytes // unit, geometry.device)
            logger.info(
                "[kv] arena: %d pages of %d bytes (%d tokens of %s)",
                self.arena.n_units,
                unit,
                self.page_size,
                geometry.label,
            )
        pool = self.pools.get(geometry)
        if pool is None:
            if geometry.device != self.arena.buf.device:
                raise BadRequest(f"KV on {geometry.device}, this worker's arena is on another")
            pool = self.pools[geometry] = KVPool(self.arena, geometry)
            logger.info("[kv] view %s: %d tokens a page", geometry.label, pool.page_size)
        return pool

    def add_stage(self, stage_key: str, geometry: KVGeometry, n_layers: int) -> KVPool:
        """Register a stage with decoder layers. Raises CacheFull when the arena cannot hold
        one page per layer of every registered stage and this one (the stage is refused),
        BadRequest as `ensure_pool`."""
        pool = self.ensure_pool(geometry)
        others = sum(n for key, (_p, n) in self._stages.items() if key != stage_key)
        if others + n_layers > pool.n_pages:
            raise CacheFull(
                f"KV budget of {self.budget_bytes} bytes ({pool.n_pages} pages) cannot hold"
                f" one page per layer of this stage ({n_layers}, {geometry.label}) next to the"
                f" {others} of the stages already loaded"
            )
        self._stages[stage_key] = (pool, n_layers)
        return pool

    def remove_stage(self, stage_key: str) -> None:
        """Free every request's KV in the stage and forget it (the stage is being unloaded)."""
        self.free_stage(stage_key)
        self._stages.pop(stage_key, None)

    def pool_of(self, stage_key: str) -> KVPool:
        """The view a registered stage's KV lives in (internal invariant: registered)."""
        got = self._stages.get(stage_key)
        assert got is not None, f"stage {stage_key[:12]} holds no KV"
        return got[0]

    def pages_for(self, n_layers: int, tokens: int, stage_key: str | None = None) -> int:
        """Pages a reservation of `tokens` tokens over `n_layers` layers takes (in the
        stage's geometry; without a stage, in pages of `page_size` tokens)."""
        size = self.pool_of(stage_key).page_size if stage_key is not None else self.page_size
        return n_layers * math.ceil(tokens / size)

    def get(self, stage_key: str, request_id: str) -> SeqKV | None:
        return self._seqs.get((stage_key, request_id))

    def make_room(self, n_pages: int, protected: set[str]) -> None:
        """Evict idle requests (LRU, whole requests, any geometry) until `n_pages` are free,
        or CacheFull."""
        arena = self.arena
        total = arena.n_units if arena is not None else 0
        if n_pages > total:
            raise CacheFull(
                f"needs {n_pages} KV pages, the whole pool has {total}"
                f" ({self.budget_bytes} bytes budget)"
            )
        assert arena is not None
        if n_pages <= arena.free_pages:
            return
        last_used: dict[str, int] = {}
        for seq in self._seqs.values():
            if seq.request_id not in protected:
                prev = last_used.get(seq.request_id, -1)
                last_used[seq.request_id] = max(prev, seq.last_used)
        for request_id in sorted(last_used, key=last_used.__getitem__):
            if n_pages <= arena.free_pages:
                break
            logger.info("[kv] evict %s (last step %d)", request_id, last_used[request_id])
            self.free_request(request_id)
        if n_pages > arena.free_pages:
            raise CacheFull(
                f"needs {n_pages} KV pages, {arena.free_pages} free after evicting idle requests"
            )

    def reserve(
        self, stage_key: str, request_id: str, n_layers: int, capacity: int, step: int
    ) -> SeqKV:
        """Page table for `capacity` tokens; the caller registered the stage and made room
        first (internal invariants)."""
        pool = self.pool_of(stage_key)
        self.free(stage_key, request_id)
        per_layer = math.ceil(capacity / pool.page_size)
        ids = pool.alloc(n_layers * per_layer)
        # ids: [n_layers * per_layer] -> pages: [n_layers, per_layer]
        pages = torch.tensor(ids, dtype=torch.int64).view(n_layers, per_layer)
        seq = SeqKV(stage_key, request_id, pages.to(pool.k.device), capacity, step, pool)
        self._seqs[(stage_key, request_id)] = seq
        return seq

    def free(self, stage_key: str, request_id: str) -> None:
        seq = self._seqs.pop((stage_key, request_id), None)
        if seq is not None:
            seq.pool.free(seq.pages.flatten().tolist())

    def free_request(self, request_id: str) -> None:
        """Free the request's KV in every stage."""
        for stage_key, rid in [k for k in self._seqs if k[1] == request_id]:
            self.free(stage_key, rid)

    def free_stage(self, stage_key: str) -> None:
        """Free every request's KV in one stage."""
        for key, rid in [k for k in self._seqs if k[0] == stage_key]:
            self.free(key, rid)

    # -- migration: one request's KV of one stage as tensors, and back ----------------------
    def export(
        self, stage_key: str, request_id: str, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of K and V of positions [0, length), each `[n_layers, length, H, Dh]`, on
        the pool's device (the caller moves them to CPU). Raises KVMiss when the request does
        not hold exactly `length` tokens in the stage."""
        seq = self.get(stage_key, request_id)
        if seq is None or seq.length != length or length <= 0:
            held = "none" if seq is None else f"{seq.length} tokens"
            raise KVMiss(f"no KV of {request_id!r} at {length} tokens to export (holds {held})")
        pool = seq.pool
        used = math.ceil(length / pool.page_size)
        idx = seq.pages[:, :used]  # [L, P] page ids
        n_layers = idx.shape[0]
        out = []
        for buf in (pool.k, pool.v):
            # buf[idx]: [L, P, ps, H, Dh] -> [L, P * ps, H, Dh] -> the first `length` positions
            pages = buf[idx].reshape(n_layers, used * pool.page_size, *buf.shape[2:])
            out.append(pages[:, :length].contiguous())
        return out[0], out[1]

    def import_(
        self,
        stage_key: str,
        request_id: str,
        k: torch.Tensor,
        v: torch.Tensor,
        capacity: int,
        step: int,
        protected: set[str],
    ) -> SeqKV:
        """Admit a request whose KV of one stage arrives as tensors (`export`'s output): make
        room for `capacity` tokens like a new request (may evict idle ones), reserve, write
        positions [0, length). Raises BadRequest (shapes, dtype) or CacheFull."""
        pool = self.pool_of(stage_key)
        g = pool.geometry
        n_layers, length = (k.shape[0], k.shape[1]) if k.dim() == 4 else (0, 0)
        want = (n_layers, length, g.n_kv_heads, g.head_dim)
        if k.dim() != 4 or tuple(k.shape) != want or tuple(v.shape) != want or n_layers == 0:
            raise BadRequest(f"KV shard shapes {tuple(k.shape)}, {tuple(v.shape)}; want {want}")
        if k.dtype != g.dtype or v.dtype != g.dtype:
            raise BadRequest(f"KV shard dtype {k.dtype}/{v.dtype}, the stage holds {g.dtype}")
        if not 0 < length <= capacity:
            raise BadRequest(f"KV shard of {length} tokens does not fit {capacity} reserved")
        self.free(stage_key, request_id)
        self.make_room(self.pages_for(n_layers, capacity, stage_key), protected | {request_id})
        seq = self.reserve(stage_key, request_id, n_layers, capacity, step)
        ps = pool.page_size
        used = math.ceil(length / ps)
        idx = seq.pages[:, :used]
        pad = used * ps - length
        for buf, src in ((pool.k, k), (pool.v, v)):
            src = src.to(g.device)
            if pad:  # [L, n, H, Dh] -> [L, P * ps, H, Dh]; the padding is never read unmasked
                src = torch.cat([src, src.new_zeros(n_layers, pad, *src.shape[2:])], dim=1)
            buf[idx] = src.view(n_layers, used, ps, *src.shape[2:])
        seq.length = length
        return seq

    def stats(self) -> KVStats:
        arena = self.arena
        if arena is None:
            return KVStats(0, 0, 0, 0, self.page_size, 0, 0, 0)
        total = arena.n_units * arena.unit_bytes
        free = arena.free_pages * arena.unit_bytes
        return KVStats(
            total_bytes=total,
            used_bytes=total - free,
            free_bytes=free,
            page_bytes=arena.unit_bytes,
            page_size=self.page_size,
            n_pages=arena.n_units,
            free_pages=arena.free_pages,
            n_sequences=len(self._seqs),
        )

    def geometry_stats(self) -> list[GeometryStats]:
        """Each geometry's pages, bytes, sequences and stages now, in the order they came."""
        out = []
        for g, pool in self.pools.items():
            seqs = [s for s in self._seqs.values() if s.pool is pool]
            used = sum(s.n_pages for s in seqs)
            stages = sum(1 for p, _n in self._stages.values() if p is pool)
            nbytes = used * pool.page_bytes
            out.append(
                GeometryStats(
                    g.label, pool.page_size, used, nbytes, len(seqs), stages, pool.page_bytes
                )
            )
        return out
