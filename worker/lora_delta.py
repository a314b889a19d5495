"""The batched LoRA delta of one stage forward: segment-grouped matmuls over stacked adapters.

The engine orders a batch's entries so that requests with the same adapter are adjacent
(`AdapterMap.order`), so within each decoder layer the rows of one adapter block form a run of
consecutive rows. For each target projection the runs of the blocks that target it become the
groups of two grouped matmuls (`torch.nn.functional.grouped_mm`, one C++ call for all groups):

    t = x[rows] @ A^T   (per group, A stacked [G, in, r])   ->  [n, r]
    d = t @ (s B)^T     (per group, B stacked [G, r, out])  ->  [n, out];   out[rows] += d

so a projection costs a fixed handful of ops per step whatever the number of adapters (the
punica / S-LoRA segment matmul, in plain torch). Ranks are zero-padded to the group's largest
(rounded up to 8: the kernel wants 16-byte strides), which adds exact zeros. The stacks are
copies of the blocks' weights, cached by the sequence of blocks (`StackCache`, bounded); a
step's whole plan is reused while the batch keeps its shape (decode), so a steady decode step
pays one tuple comparison per stage. Where the kernel does not apply (another device, dtype
or alignment) the groups run one by one (`F.linear` pairs) with the same stacks.
Compute-thread only.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

# stacks no step uses are kept (least recently used out) up to this many bytes per stage
STACK_IDLE_BYTES = 64 << 20
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(slots=True)
class ModuleDelta:
    """One projection's groups in one step: `rows` (a slice when consecutive, else an index
    tensor) of the flattened batch, in group order; `sizes` rows per group (`offs` = their
    cumulative ends, int32); `a` [G, in, r] and `b` [G, r, out] (scaling folded in)."""

    rows: slice | torch.Tensor
    sizes: list[int]
    offs: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    kernel: bool

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[rows] += the groups' low-rank products of x[rows] (x [N, in], out [N, out])."""
        rows = self.rows
        xs = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
        xs = xs.to(self.a.dtype)
        if self.kernel:
            xs = xs.contiguous()
            d = F.grouped_mm(F.grouped_mm(xs, self.a, offs=self.offs), self.b, offs=self.offs)
        else:
            parts = xs.split(self.sizes)
            d = torch.cat([p @ self.a[g] @ self.b[g] for g, p in enumerate(parts)])
        d = d.to(out.dtype)
        if isinstance(rows, slice):
            out[rows].add_(d)
        else:
            out.index_add_(0, rows, d)


@dataclass(slots=True)
class LoraStep:
    """The deltas of one batched forward by (layer index in the stage, module name)."""

    modules: dict[tuple[int, str], ModuleDelta] = field(default_factory=dict)


class StackCache:
    """Stacked (A^T, sB^T) of a sequence of adapter blocks for one module, by (module, blocks);
    the ones the current step uses stay, idle ones are dropped LRU beyond `idle_bytes`."""

    def __init__(self, idle_bytes: int = STACK_IDLE_BYTES) -> None:
        self.idle_bytes = idle_bytes
        self._stacks: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._in_use: set[tuple] = set()
        self.builds = 0

    def get(
        self,
        name: str,
        blocks: tuple[str, ...],
        weights: Callable[[str], Any],
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (name, blocks)
        self._in_use.add(key)
        hit = self._stacks.get(key)
        if hit is not None:
            self._stacks.move_to_end(key)
            return hit
        parts = [weights(b)[name] for b in blocks]  # (A [r, in], B [out, r], scaling)
        dtype = parts[0][0].dtype
        for a, _, _ in parts:
            dtype = torch.promote_types(dtype, a.dtype)
        r = -(-max(a.shape[0] for a, _, _ in parts) // 8) * 8
        d_in, d_out = parts[0][0].shape[1], parts[0][1].shape[0]
        sa = torch.zeros(len(parts), d_in, r, dtype=dtype, device=device)
        sb = torch.zeros(len(parts), r, d_out, dtype=dtype, device=device)
        for g, (a, b, s) in enumerate(parts):
            sa[g, :, : a.shape[0]] = a.t()
            sb[g, : a.shape[0], :] = b.t() * s
        self._stacks[key] = (sa, sb)
        self.builds += 1
        return sa, sb

    def settle(self) -> None:
        """End of planning a step: drop idle stacks over the byte budget, oldest first."""
        idle = [k for k in self._stacks if k not in self._in_use]
        size = sum(_nbytes(self._stacks[k]) for k in idle)
        for k in idle:
            if size <= self.idle_bytes:
                break
            size -= _nbytes(self._stacks.pop(k))
        self._in_use = set()

    @property
    def total_bytes(self) -> int:
        return sum(_nbytes(v) for v in self._stacks.values())


def _nbytes(stack: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in stack)


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


def plan_step(
    first_position: int,
    targets: dict[int, Sequence[str]],
    maps: Sequence[dict[int, str]],
    lengths: Sequence[int],
    weights: Callable[[str], Any],
    stacks: StackCache,
    device: torch.device,
) -> LoraStep | None:
    """The LoraStep of a batch: entry i has `lengths[i]` rows and adapter blocks by chain
    position `maps[i]`; `targets` = per layer index j (chain position `first_position + j`)
    the names of its target projections. None when no block applies here."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    step = LoraStep()
    for j, mods in targets.items():
        runs = _runs(first_position + j, maps, offsets)
        if not runs:
            continue
        for name in mods:
            mine = [(b, lo, hi) for b, lo, hi in runs if name in weights(b)]
            if not mine:
                continue
            sa, sb = stacks.get(name, tuple(b for b, _, _ in mine), weights, device)
            sizes = [hi - lo for _, lo, hi in mine]
            if all(p[2] == q[1] for p, q in itertools.pairwise(mine)):
                rows: slice | torch.Tensor = slice(mine[0][1], mine[-1][2])
            else:
                rows = torch.cat([torch.arange(lo, hi) for _, lo, hi in mine]).to(device)
            offs = torch.tensor(sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            kernel = (
                device.type == "cpu"
                and sa.dtype in _KERNEL_DTYPES
                and sa.shape[1] % 8 == 0
                and sb.shape[2] % 8 == 0
            )
            step.modules[(j, name)] = ModuleDelta(rows, sizes, offs.to(device), sa, sb, kernel)
    stacks.settle()
    return step if step.modules else None
