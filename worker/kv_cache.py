"""The worker's KV-cache shard: one preallocated paged pool, page tables per (stage, request).

The pool is allocated once, from the worker's byte budget, as two tensors (K and V) of
`[n_pages, page_size, n_kv_heads, head_dim]`. A page holds `page_size` tokens of ONE decoder
layer of one request, so every stage of the worker (whatever its layer count) draws from the
same pool and the budget is never split in advance. A request's state in a stage is a page
table `[n_layers, pages_per_layer]` reserved up front for its `max_total_len`; admission fails
with CacheFull rather than running out mid-way. Idle requests may be evicted (least recently
used first, never a protected one); the next item of an evicted request then gets KV_MISS.

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
    """What one KV page looks like: its heads, head size, dtype and device."""

    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def page_bytes(self, page_size: int) -> int:
        """Bytes of one page of K plus its page of V."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * page_size * self.n_kv_heads * self.head_dim * itemsize


@dataclass(frozen=True, slots=True)
class KVStats:
    """Byte accounting of the pool (all zero before the first stage with layers loads)."""

    total_bytes: int
    used_bytes: int
    free_bytes: int
    page_bytes: int
    page_size: int
    n_pages: int
    free_pages: int
    n_sequences: int


class KVPool(nn.Module):
    """The preallocated K and V page tensors plus a free list of page ids."""

    def __init__(self, geometry: KVGeometry, budget_bytes: int, page_size: int) -> None:
        super().__init__()
        self.geometry = geometry
        self.page_size = page_size
        self.page_bytes = geometry.page_bytes(page_size)
        self.n_pages = budget_bytes // self.page_bytes
        shape = (self.n_pages, page_size, geometry.n_kv_heads, geometry.head_dim)
        # zeros, not empty: padded gathers read unused slots (masked out, but never NaN)
        kw = {"dtype": geometry.dtype, "device": geometry.device}
        self.register_buffer("k", torch.zeros(shape, **kw), persistent=False)
        self.register_buffer("v", torch.zeros(shape, **kw), persistent=False)
        # a stack: the most recently freed pages are reused first (warm in cache)
        self._free: list[int] = list(range(self.n_pages - 1, -1, -1))

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        """Take `n` pages; the caller has checked `free_pages` (internal invariant)."""
        assert n <= len(self._free), "alloc past the free list"
        taken = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        return taken[::-1]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


class SeqKV:
    """One request's KV in one stage: its page table, filled length and last use."""

    __slots__ = ("capacity", "last_used", "length", "pages", "request_id", "stage_key")

    def __init__(
        self, stage_key: str, request_id: str, pages: torch.Tensor, capacity: int, step: int
    ) -> None:
        self.stage_key = stage_key
        self.request_id = request_id
        self.pages = pages  # [n_layers, pages_per_layer] int64 page ids (on the pool's device)
        self.capacity = capacity  # tokens reserved
        self.length = 0  # tokens written
        self.last_used = step

    @property
    def n_pages(self) -> int:
        return self.pages.numel()


class KVCacheManager:
    """All KV state of a worker: the pool, page tables per (stage, request), eviction.

    Raises CacheFull when a reservation does not fit even after evicting idle requests, and
    BadRequest when a stage's geometry differs from the pool's (one geometry per worker).
    """

    def __init__(self, budget_bytes: int, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        if budget_bytes < 0 or page_size <= 0:
            raise ValueError("kv budget must be >= 0 and page_size > 0")
        self.budget_bytes = budget_bytes
        self.page_size = page_size
        self.pool: KVPool | None = None
        self._seqs: dict[tuple[str, str], SeqKV] = {}

    def ensure_pool(self, geometry: KVGeometry) -> KVPool:
        """The pool, allocated at the first stage with layers; later stages must match it."""
        if self.pool is None:
            self.pool = KVPool(geometry, self.budget_bytes, self.page_size)
            logger.info(
                "[kv] pool: %d pages x %d tokens (%d bytes each), %s",
                self.pool.n_pages,
                self.page_size,
                self.pool.page_bytes,
                geometry,
            )
        elif self.pool.geometry != geometry:
            raise BadRequest(
                f"KV geometry {geometry} differs from this worker's pool ({self.pool.geometry}):"
                " one model family (head layout, dtype, device) per worker"
            )
        return self.pool

    def pages_for(self, n_layers: int, tokens: int) -> int:
        """Pages a reservation of `tokens` tokens over `n_layers` layers takes."""
        return n_layers * math.ceil(tokens / self.page_size)

    def get(self, stage_key: str, request_id: str) -> SeqKV | None:
        return self._seqs.get((stage_key, request_id))

    def make_room(self, n_pages: int, protected: set[str]) -> None:
        """Evict idle requests (LRU, whole requests) until `n_pages` are free, or CacheFull."""
        pool = self.pool
        total = pool.n_pages if pool is not None else 0
        if n_pages > total:
            raise CacheFull(
                f"needs {n_pages} KV pages, the whole pool has {total}"
                f" ({self.budget_bytes} bytes budget)"
            )
        assert pool is not None
        if n_pages <= pool.free_pages:
            return
        last_used: dict[str, int] = {}
        for seq in self._seqs.values():
            if seq.request_id not in protected:
                prev = last_used.get(seq.request_id, -1)
                last_used[seq.request_id] = max(prev, seq.last_used)
        for request_id in sorted(last_used, key=last_used.__getitem__):
            if n_pages <= pool.free_pages:
                break
            logger.info("[kv] evict %s (last step %d)", request_id, last_used[request_id])
            self.free_request(request_id)
        if n_pages > pool.free_pages:
            raise CacheFull(
                f"needs {n_pages} KV pages, {pool.free_pages} free after evicting idle requests"
            )

    def reserve(
        self, stage_key: str, request_id: str, n_layers: int, capacity: int, step: int
    ) -> SeqKV:
        """Page table for `capacity` tokens; the caller made room first (internal invariant)."""
        assert self.pool is not None, "reserve before ensure_pool"
        self.free(stage_key, request_id)
        per_layer = math.ceil(capacity / self.page_size)
        ids = self.pool.alloc(n_layers * per_layer)
        # ids: [n_layers * per_layer] -> pages: [n_layers, per_layer]
        pages = torch.tensor(ids, dtype=torch.int64).view(n_layers, per_layer)
        seq = SeqKV(stage_key, request_id, pages.to(self.pool.geometry.device), capacity, step)
        self._seqs[(stage_key, request_id)] = seq
        return seq

    def free(self, stage_key: str, request_id: str) -> None:
        seq = self._seqs.pop((stage_key, request_id), None)
        if seq is not None and self.pool is not None:
            self.pool.free(seq.pages.flatten().tolist())

    def free_request(self, request_id: str) -> None:
        """Free the request's KV in every stage."""
        for stage_key, rid in [k for k in self._seqs if k[1] == request_id]:
            self.free(stage_key, rid)

    def free_stage(self, stage_key: str) -> None:
        """Free every request's KV in one stage (the stage is being unloaded)."""
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
        assert self.pool is not None
        used = math.ceil(length / self.page_size)
        idx = seq.pages[:, :used]  # [L, P] page ids
        n_layers = idx.shape[0]
        out = []
        for buf in (self.pool.k, self.pool.v):
            # buf[idx]: [L, P, ps, H, Dh] -> [L, P * ps, H, Dh] -> the first `length` positions
            pages = buf[idx].reshape(n_layers, used * self.page_size, *buf.shape[2:])
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
        assert self.pool is not None, "import before ensure_pool"
        g = self.pool.geometry
        n_layers, length = (k.shape[0], k.shape[1]) if k.dim() == 4 else (0, 0)
        want = (n_layers, length, g.n_kv_heads, g.head_dim)
        if k.dim() != 4 or tuple(k.shape) != want or tuple(v.shape) != want or n_layers == 0:
            raise BadRequest(f"KV shard shapes {tuple(k.shape)}, {tuple(v.shape)}; want {want}")
        if k.dtype != g.dtype or v.dtype != g.dtype:
            raise BadRequest(f"KV shard dtype {k.dtype}/{v.dtype}, the pool holds {g.dtype}")
        if not 0 < length <= capacity:
            raise BadRequest(f"KV shard of {length} tokens does not fit {capacity} reserved")
        self.free(stage_key, request_id)
        self.make_room(self.pages_for(n_layers, capacity), protected | {request_id})
        seq = self.reserve(stage_key, request_id, n_layers, capacity, step)
        used = math.ceil(length / self.page_size)
        idx = seq.pages[:, :used]
        pad = used * self.page_size - length
        for buf, src in ((self.pool.k, k), (self.pool.v, v)):
            src = src.to(g.device)
            if pad:  # [L, n, H, Dh] -> [L, P * ps, H, Dh]; the padding is never read unmasked
                src = torch.cat([src, src.new_zeros(n_layers, pad, *src.shape[2:])], dim=1)
            buf[idx] = src.view(n_layers, used, self.page_size, *src.shape[2:])
        seq.length = length
        return seq

    def stats(self) -> KVStats:
        pool = self.pool
        if pool is None:
            return KVStats(0, 0, 0, 0, self.page_size, 0, 0, 0)
        total = pool.n_pages * pool.page_bytes
        free = pool.free_pages * pool.page_bytes
        return KVStats(
            total_bytes=total,
            used_bytes=total - free,
            free_bytes=free,
            page_bytes=pool.page_bytes,
            page_size=self.page_size,
            n_pages=pool.n_pages,
            free_pages=pool.free_pages,
            n_sequences=len(self._seqs),
        )
