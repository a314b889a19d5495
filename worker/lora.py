"""LoRA adapters applied per request on shared blocks: the base layer runs once for the batch.

A stage's target projections (zoo.families.LORA_TARGETS: q/k/v/o and gate/up/down, Phi-3's
fused qkv/gate_up, GPT-2's Conv1D c_attn/c_proj/c_fc) become `LoraLinear`s or `LoraConv1D`s
(same weights and names). Before a batched forward the engine has the stage's `LoraHooks`
plan the step: the batch is ordered so each adapter's rows are consecutive, and for each layer
and projection the runs of rows of the blocks targeting it become the groups of two grouped
matmuls adding `(x[rows] A^T) (s B)^T` to the projection's output rows (worker/lora_delta.py):
a fixed few ops per projection per step, no loop over adapters, tokens or requests, and the
base weights are never touched (no merge). This is PEFT's `result + lora_B(lora_A(x)) *
scaling` for exactly the rows of that adapter's requests.

Adapter weights live in `AdapterCache`, keyed by adapter block id and refcounted by the requests
using them (a request holds its adapter blocks from its first item to its release); a block no
request holds stays resident, least recently used first out, up to `idle_limit` blocks. A block
is held once: as read until it is first used at a chain position, then only as slots of the
pools the grouped matmuls read (worker/lora_pool.py); `total_bytes` counts all of it.
Compute-thread only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from blockllm.worker.errors import BadRequest
from blockllm.worker.lora_delta import LoraStep, plan_step
from blockllm.worker.lora_pool import Pool, padded_rank
from blockllm.zoo.families import LORA_TARGETS

logger = logging.getLogger(__name__)

PLANS_KEPT = 4  # step plans kept per stage, by batch shape
# module (relative to the layer) -> (A [r, in], B [out, r], scaling)
AdapterWeights = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def adapter_weights(tensors: dict[str, torch.Tensor]) -> AdapterWeights:
    """An adapter block's tensors (`<module>.lora_A|lora_B|scaling`) by module; BadRequest if
    the block is not one."""
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        if kind not in ("lora_A", "lora_B", "scaling") or not module:
            raise BadRequest(f"adapter block has an unexpected tensor {name!r}")
        mods.setdefault(module, {})[kind] = t
    out: AdapterWeights = {}
    for module, parts in mods.items():
        if set(parts) != {"lora_A", "lora_B", "scaling"}:
            raise BadRequest(f"adapter block module {module!r} is incomplete")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise BadRequest(f"adapter block module {module!r}: shapes {a.shape}, {b.shape}")
        out[module] = (a, b, float(parts["scaling"]))
    return out


class _Block:
    """A resident adapter block: its module names, its tensors as read (until placed) and its
    pools by chain position (position -> module -> pool)."""

    __slots__ = ("modules", "places", "raw", "seq")

    def __init__(self, raw: AdapterWeights, seq: int) -> None:
        self.modules = frozenset(raw)
        self.raw: AdapterWeights | None = raw
        self.places: dict[int, dict[str, Pool]] = {}
        self.seq = seq  # arrival order (batches sort by it: slots fill in the same order)

    @property
    def raw_bytes(self) -> int:
        if self.raw is None:
            return 0
        return sum(t.numel() * t.element_size() for a, b, _ in self.raw.values() for t in (a, b))


class AdapterCache:
    """Adapter blocks by id, refcounted by request; idle ones kept (LRU) up to `idle_limit`.
    Their weights live in pools (`placed`); `version` changes whenever a pool does (plans
    holding views of pools are then rebuilt)."""

    def __init__(
        self, loader: Callable[[str], dict[str, torch.Tensor]], idle_limit: int = 256
    ) -> None:
        self._loader = loader
        self.idle_limit = idle_limit
        self._blocks: dict[str, _Block] = {}
        self._refs: dict[str, int] = {}
        self._held: dict[str, tuple[str, ...]] = {}  # request id -> blocks it holds
        self._idle: OrderedDict[str, None] = OrderedDict()
        self._pools: dict[tuple, Pool] = {}
        self._seq = 0
        self.version = 0
        self.loads = 0

    def admit(
        self,
        request_id: str,
        pairs: Sequence[tuple[int, str]],
        stages: Sequence[tuple[int, Any]],
    ) -> AdapterMap:
        """A work item's (position, block id) pairs checked against the decoder layers of its
        stages (`stages`: (start position, StageModel) each) and held for the request from now
        on (placed in the pools of their positions); returns them by position. Raises
        BadRequest (a position that is no decoder layer there, a bad id, a block whose modules
        the layer lacks, a block the zoo cannot give)."""
        from blockllm.zoo.errors import ZooError
        from blockllm.zoo.store import check_block_id

        if not pairs:
            return AdapterMap()
        layers = {  # chain position -> (its stage's hooks, layer index in the stage)
            max(start, 1) + j: (model.lora, j)
            for start, model in stages
            for j in range(len(model.layers))
        }
        out: dict[int, str] = {}
        try:
            for pos, bid in pairs:
                if pos not in layers:
                    raise BadRequest(f"adapter position {pos!r} is no decoder layer of the stages")
                out[pos] = check_block_id(bid)
            self.acquire(request_id, out.values())
        except ZooError as e:
            raise BadRequest(f"adapter block: {e}") from e
        for pos, bid in out.items():
            hooks, j = layers[pos]
            odd = hooks.unknown(j, self._blocks[bid].modules)
            if odd:
                self.release(request_id)
                raise BadRequest(f"adapter block {bid[:12]} targets {odd}, absent from the layer")
        for pos, bid in out.items():
            self._place(bid, pos)
        blocks = [self._blocks[b] for b in out.values()]
        return AdapterMap(out, (m for b in blocks for m in b.modules), min(b.seq for b in blocks))

    def _place(self, block_id: str, position: int) -> None:
        """Put a block's modules into the pools of `position` (from its tensors as read, or
        from its slots at another position), then drop the tensors as read."""
        blk = self._blocks[block_id]
        if position in blk.places:
            return
        placed: dict[str, Pool] = {}
        other = next(iter(blk.places.values()), None)
        for name in sorted(blk.modules):
            if blk.raw is not None:
                a, b, s = blk.raw[name]
                a_t, b_t, r = a.t(), b.t() * s, a.shape[0]
            else:
                assert other is not None
                a_t, b_t = other[name].view(block_id)
                r = a_t.shape[1]
            key = (position, name, a_t.shape[0], b_t.shape[1], padded_rank(r), a_t.dtype)
            key += (a_t.device,)
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = Pool(
                    a_t.shape[0], b_t.shape[1], padded_rank(r), a_t.dtype, a_t.device
                )
            pool.put(block_id, a_t, b_t)
            placed[name] = pool
        blk.places[position] = placed
        blk.raw = None
        self.version += 1

    def placed(self, block_id: str, position: int) -> dict[str, Pool]:
        return self._blocks[block_id].places[position]

    def per_span(self, spans: dict[str, tuple[int, int]]) -> dict[str, int]:
        """Key -> resident blocks used at a chain position in its [start, end) span."""
        used = [blk.places for blk in self._blocks.values()]
        return {
            k: sum(1 for ps in used if any(a <= p < b for p in ps)) for k, (a, b) in spans.items()
        }

    def acquire(self, request_id: str, block_ids: Iterable[str]) -> None:
        """The request holds these blocks (loaded now if absent) until `release`. A request
        that already holds blocks keeps them and adds the new ones. Raises BadRequest, ZooError
        (both before anything changes for a block that fails)."""
        held = self._held.get(request_id, ())
        new = [b for b in dict.fromkeys(block_ids) if b not in held]
        for bid in new:
            if bid not in self._blocks:
                tensors = self._loader(bid)
                self._add(bid, tensors)
                logger.debug("[lora] loaded adapter block %s", bid[:12])
        for bid in new:
            self._refs[bid] += 1
            self._idle.pop(bid, None)
        if new:
            self._held[request_id] = (*held, *new)

    def _add(self, block_id: str, tensors: dict[str, torch.Tensor]) -> None:
        self._blocks[block_id] = _Block(adapter_weights(tensors), self._seq)
        self._seq += 1
        self._refs[block_id] = 0
        self.loads += 1

    def release(self, request_id: str) -> None:
        for bid in self._held.pop(request_id, ()):
            self._refs[bid] -= 1
            if self._refs[bid] == 0:
                self._idle[bid] = None
        while len(self._idle) > self.idle_limit:
            bid, _ = self._idle.popitem(last=False)
            self._drop(bid)
            logger.debug("[lora] dropped idle adapter block %s", bid[:12])

    def _drop(self, block_id: str) -> None:
        blk = self._blocks.pop(block_id)
        del self._refs[block_id]
        for pools in blk.places.values():
            for pool in pools.values():
                pool.drop(block_id)
        if blk.places:
            self._pools = {k: p for k, p in self._pools.items() if len(p)}
            self.version += 1

    def has(self, block_id: str) -> bool:
        return block_id in self._blocks

    def insert(self, block_id: str, tensors: dict[str, torch.Tensor]) -> None:
        """A block read elsewhere (the loader thread) made resident, held by no request yet
        (idle: the next `release` may drop it if over the limit). Raises BadRequest."""
        if block_id in self._blocks:
            return
        self._add(block_id, tensors)
        self._idle[block_id] = None

    def modules(self, block_id: str) -> frozenset[str]:
        return self._blocks[block_id].modules

    def resident(self) -> tuple[str, ...]:
        return tuple(self._blocks)

    def refs(self, block_id: str) -> int:
        return self._refs.get(block_id, 0)

    @property
    def total_bytes(self) -> int:
        """Every byte held for adapters: the pools (free slots included) and blocks read but
        not yet placed."""
        pools = sum(p.nbytes for p in self._pools.values())
        return pools + sum(b.raw_bytes for b in self._blocks.values())


class AdapterMap(dict[int, str]):
    """A request's adapter blocks by chain position, with `key` (the blocks, hashable) and
    `order` (targeted modules, then blocks): sorting a batch by `order` makes the rows of one
    adapter consecutive, and those of adapters with the same targets neighbours."""

    __slots__ = ("key", "order")

    def __init__(
        self, blocks: dict[int, str] | None = None, targets: Iterable[str] = (), seq: int = 0
    ) -> None:
        super().__init__(blocks or {})
        self.key: tuple[tuple[int, str], ...] = tuple(sorted(self.items()))
        # arrival order after the targets: the order its blocks' pool slots were filled in
        self.order: tuple = (tuple(sorted(set(targets))), seq, self.key) if self else ()


def _add_deltas(mod: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Add the current step's LoRA deltas for projection `mod` to its output `out`, in place."""
    step = mod.lora_hooks.step
    if step is not None:
        deltas = step.modules.get(mod.lora_key)
        if deltas is not None:  # x [1, N, in], out [1, N, out] -> flat views
            xf, of = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
            for delta in deltas:
                delta.apply(xf, of)
    return out


class LoraLinear(nn.Linear):
    """A target projection of a stage: its Linear, plus the current step's delta for it if
    any (set on an existing nn.Linear by `LoraHooks`, weights and names unchanged; no hook)."""

    lora_hooks: LoraHooks
    lora_key: tuple[int, str]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _add_deltas(self, x, F.linear(x, self.weight, self.bias))


class LoraConv1D(Conv1D):
    """The same for GPT-2's Conv1D projections (weight [in, out]): PEFT's delta is the same
    `lora_B(lora_A(x)) * scaling` (its fan_in_fan_out only matters when merging)."""

    lora_hooks: LoraHooks
    lora_key: tuple[int, str]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _add_deltas(self, x, super().forward(x))


_LORA_CLASS: dict[type, type] = {nn.Linear: LoraLinear, Conv1D: LoraConv1D}


class LoraHooks:
    """The target projections of a stage's decoder layers (made `LoraLinear`s) and the delta
    plan of the forward running now (`prepare` before it, `finish` after; None = no adapter in
    the batch). The last plan is kept and reused while the batch keeps its shape."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.step: LoraStep | None = None
        self.modules: dict[int, dict[str, nn.Module]] = {}
        for j, layer in enumerate(layers):
            for name, mod in layer.named_modules():
                cls = _LORA_CLASS.get(type(mod))
                if cls is not None and name.rpartition(".")[2] in LORA_TARGETS:
                    self.modules.setdefault(j, {})[name] = mod
                    mod.__class__ = cls  # as torch.nn.utils.parametrize does
                    mod.lora_hooks, mod.lora_key = self, (j, name)
        # the last few plans by batch shape (micro-batch groups alternate: worker/groups.py),
        # valid while the adapter pools keep their `version`
        self._plans: OrderedDict[tuple, LoraStep | None] = OrderedDict()
        self._version = -1

    def unknown(self, j: int, modules: Iterable[str]) -> list[str]:
        """Modules of an adapter block that layer `j` of the stage has no target for."""
        return sorted(set(modules) - set(self.modules.get(j, {})))

    @property
    def plan_bytes(self) -> int:
        """Bytes of the compact stacks the kept plans hold (scattered slots only)."""
        return sum(p.copy_bytes for p in self._plans.values() if p is not None)

    def prepare(
        self,
        first_position: int,
        maps: Sequence[AdapterMap],
        lengths: Sequence[int],
        cache: AdapterCache,
    ) -> None:
        """Plan the deltas of a forward of entries with these adapter maps (AdapterMap) and
        row counts, the rows in this order; layer j of the stage is chain position
        `first_position + j`."""
        if not any(maps):
            self.step = None
            return
        if cache.version != self._version:  # pools changed: views may be stale
            self._plans.clear()
            self._version = cache.version
        key = tuple((m.key, n) for m, n in zip(maps, lengths, strict=True))
        if key in self._plans:
            self._plans.move_to_end(key)
            self.step = self._plans[key]
            return
        self.step = plan_step(first_position, self.modules, maps, lengths, cache)
        self._plans[key] = self.step
        while len(self._plans) > PLANS_KEPT:
            self._plans.popitem(last=False)

    def finish(self) -> None:
        self.step = None
