"""Resident LoRA weights as pools: the stacks the grouped matmuls read, and no other copy.

An adapter block's module (A [r, in], B [out, r], scaling s) is kept once, in the form the
kernel reads, as a slot of the pool of its (chain position, module, in, out, padded rank,
dtype, device): A^T in `a[slot]` [in, R] and (s B)^T in `b[slot]` [R, out], R = r rounded up
to 16 (the kernel wants 16-byte strides; the padding holds exact zeros; one class for the
usual ranks 8-16, so one pool, one grouped matmul pair per module and step). The tensors the zoo
gave are dropped once a block is placed. A step reads a range of slots of a pool as a view
(worker/lora_delta.py); each slot in that range is a group of the grouped matmul, and a
slot no row of the batch uses costs an empty group (a few microseconds), so free slots are
reused lowest first and a pool that falls to half its capacity is compacted. A pool grows
by an eighth when full. Compute-thread only.
"""

from __future__ import annotations

import torch

RANK_ALIGN = 16


def padded_rank(r: int) -> int:
    return -(-r // RANK_ALIGN) * RANK_ALIGN


class Pool:
    """Slots of one (position, module, shapes, padded rank, dtype, device); `slot_of` maps a
    block id to its slot; `a` [capacity, in, R], `b` [capacity, R, out]. Changing a pool may
    reallocate its tensors: plans holding views of them must be dropped (AdapterCache.version).
    """

    def __init__(
        self, d_in: int, d_out: int, rank: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.rank = rank
        self.a = torch.zeros(0, d_in, rank, dtype=dtype, device=device)
        self.b = torch.zeros(0, rank, d_out, dtype=dtype, device=device)
        self.slot_of: dict[str, int] = {}
        self._free: list[int] = []

    def put(self, block_id: str, a_t: torch.Tensor, b_t: torch.Tensor) -> None:
        """Hold a block's A^T [in, r] and (s B)^T [r, out] (r <= R) in a free slot."""
        if block_id in self.slot_of:
            return
        if not self._free:
            self._grow()
        slot = self._free.pop(0)
        r = a_t.shape[1]
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.a[slot, :, :r] = a_t
        self.b[slot, :r, :] = b_t
        self.slot_of[block_id] = slot

    def view(self, block_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's padded A^T [in, R] and (s B)^T [R, out] (views of the pool)."""
        slot = self.slot_of[block_id]
        return self.a[slot], self.b[slot]

    def drop(self, block_id: str) -> None:
        slot = self.slot_of.pop(block_id)
        self._free.append(slot)
        self._free.sort()
        cap = self.a.shape[0]
        if cap > 8 and len(self.slot_of) <= cap // 2:
            self._compact()

    def _grow(self) -> None:
        cap = self.a.shape[0]
        new = cap + max(1, cap // 8)
        self._resize(new, list(range(cap)))
        self._free.extend(range(cap, new))

    def _compact(self) -> None:
        live = sorted(self.slot_of, key=self.slot_of.__getitem__)
        self._resize(len(live), [self.slot_of[b] for b in live])
        self.slot_of = {b: i for i, b in enumerate(live)}
        self._free = []

    def _resize(self, capacity: int, keep: list[int]) -> None:
        a = self.a.new_zeros(capacity, *self.a.shape[1:])
        b = self.b.new_zeros(capacity, *self.b.shape[1:])
        if keep:
            idx = torch.tensor(keep, device=self.a.device)
            a[: len(keep)] = self.a.index_select(0, idx)
            b[: len(keep)] = self.b.index_select(0, idx)
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.slot_of)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b))
