"""The batched LoRA delta of one stage forward: segment-grouped matmuls over pooled adapters.

The engine orders a batch's entries so that requests with the same adapter are adjacent
(`AdapterMap.order`), so within each decoder layer the rows of one adapter block form a run of
consecutive rows. Each adapter block's modules live as slots of pools (worker/lora_pool.py:
A^T and scaled B^T, rank padded); for each target projection the runs of the blocks in one
pool become the groups of two grouped matmuls (`torch.nn.functional.grouped_mm`, one C++ call
for all groups) over a range of the pool's slots, read in place:

    t = x[rows] @ A^T   (per slot, a[lo:hi] [G, in, R])   ->  [n, R]
    d = t @ (s B)^T     (per slot, b[lo:hi] [G, R, out])  ->  [n, out];   out[rows] += d

the rows gathered in slot order (a slice when they already are), slots of the range no row
uses being empty groups. So a projection costs a fixed handful of ops per step whatever the
number of adapters (the punica / S-LoRA segment matmul, in plain torch), and no copy of the
weights is made for it. Only when the range would hold more empty groups than used ones
(scattered slots) does the plan gather its slots into a compact stack of its own (`copy_bytes`,
gone with the plan). A step's whole plan is reused while the batch keeps its shape (decode),
so a steady decode step pays one tuple comparison per stage. Where the kernel does not apply
(another device, dtype or alignment) the groups run one by one (matmul pairs) over the same
slots. Compute-thread only.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from blockllm.worker.lora_pool import Pool

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Placements(Protocol):
    def placed(self, block_id: str, position: int) -> dict[str, Pool]:
        """The block's pools at a chain position, by module."""
        ...


@dataclass(slots=True)
class ModuleDelta:
    """One pool's groups of one projection in one step: `rows` (a slice when consecutive, else
    an index tensor) of the flattened batch, in slot order; `sizes` rows per group (`offs` =
    their cumulative ends, int32); `a` [G, in, R] and `b` [G, R, out] (scaling folded in)."""

    rows: slice | torch.Tensor
    sizes: list[int]
    offs: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    kernel: bool

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[rows] += the groups' low-rank products of x[rows] (x [N, in], out [N, out])."""
        rows, a = self.rows, self.a
        xs = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
        if xs.dtype != a.dtype:  # each call costs even when it changes nothing: only if needed
            xs = xs.to(a.dtype)
        if self.kernel:
            if not xs.is_contiguous():
                xs = xs.contiguous()
            d = F.grouped_mm(F.grouped_mm(xs, a, offs=self.offs), self.b, offs=self.offs)
        else:
            parts = xs.split(self.sizes)
            d = torch.cat([p @ a[g] @ self.b[g] for g, p in enumerate(parts) if len(p)])
        if d.dtype != out.dtype:
            d = d.to(out.dtype)
        if isinstance(rows, slice):
            out[rows].add_(d)
        else:
            out.index_add_(0, rows, d)


@dataclass(slots=True)
class LoraStep:
    """The deltas of one batched forward by (layer index in the stage, module name): one per
    pool the batch's blocks of that module are in (one per padded rank, usually one)."""

    modules: dict[tuple[int, str], tuple[ModuleDelta, ...]] = field(default_factory=dict)
    copy_bytes: int = 0  # compact stacks gathered for scattered slots (held by this plan)


def _runs(
    position: int, maps: Sequence[dict[int, str]], offsets: Sequence[int]
) -> list[tuple[str, int, int]]:
    """(block, first row, end row) of each run of consecutive rows with one block at a chain
    position (rows without an adapter block there belong to no run)."""
    runs: list[tuple[str, int, int]] = []
    for i, m in enumerate(maps):
        bid = m.get(position)
        if bid is None:
            continue
        lo, hi = offsets[i], offsets[i + 1]
        if runs and runs[-1][0] == bid and runs[-1][2] == lo:
            runs[-1] = (bid, runs[-1][1], hi)
        else:
            runs.append((bid, lo, hi))
    return runs


def _delta(pool: Pool, parts: list[tuple[int, int, int]], step: LoraStep) -> ModuleDelta:
    """The delta over one pool of runs (slot, first row, end row)."""
    parts.sort(key=lambda p: p[0])  # stable: one slot's runs keep their row order
    device = pool.a.device
    first, last = parts[0][0], parts[-1][0]
    used = sorted({s for s, _, _ in parts})
    if (last - first + 1) - len(used) <= len(used):  # read the range of slots in place
        sizes = [0] * (last - first + 1)
        for s, lo, hi in parts:
            sizes[s - first] += hi - lo
        a, b = pool.a[first : last + 1], pool.b[first : last + 1]
    else:  # scattered: a compact stack of just these slots, for this plan
        rank = {s: g for g, s in enumerate(used)}
        sizes = [0] * len(used)
        for s, lo, hi in parts:
            sizes[rank[s]] += hi - lo
        idx = torch.tensor(used, device=device)
        a, b = pool.a.index_select(0, idx), pool.b.index_select(0, idx)
        step.copy_bytes += sum(t.numel() * t.element_size() for t in (a, b))
    if all(q[1] == p[2] for p, q in itertools.pairwise(parts)):
        rows: slice | torch.Tensor = slice(parts[0][1], parts[-1][2])
    else:
        # one tensor from a list: far cheaper than an arange per run (a plan has hundreds)
        rows = torch.tensor([i for _, lo, hi in parts for i in range(lo, hi)], device=device)
    offs = torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.int32, device=device)
    kernel = (
        device.type == "cpu"
        and a.dtype in _KERNEL_DTYPES
        and a.shape[1] % 8 == 0
        and b.shape[2] % 8 == 0
    )
    return ModuleDelta(rows, sizes, offs, a, b, kernel)


def plan_step(
    first_position: int,
    targets: dict[int, Sequence[str]],
    maps: Sequence[dict[int, str]],
    lengths: Sequence[int],
    cache: Placements,
) -> LoraStep | None:
    """The LoraStep of a batch: entry i has `lengths[i]` rows and adapter blocks by chain
    position `maps[i]` (placed in `cache`'s pools); `targets` = per layer index j (chain
    position `first_position + j`) the names of its target projections. None when no block
    applies here."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    step = LoraStep()
    for j, mods in targets.items():
        pos = first_position + j
        runs = _runs(pos, maps, offsets)
        if not runs:
            continue
        placed = [(cache.placed(bid, pos), bid, lo, hi) for bid, lo, hi in runs]
        for name in mods:
            by_pool: dict[int, tuple[Pool, list[tuple[int, int, int]]]] = {}
            for pools, bid, lo, hi in placed:
                pool = pools.get(name)
                if pool is not None:
                    by_pool.setdefault(id(pool), (pool, []))[1].append((pool.slot_of[bid], lo, hi))
            if by_pool:
                step.modules[(j, name)] = tuple(_delta(p, r, step) for p, r in by_pool.values())
    return step if step.modules else None
