"""LoRA adapters applied per request on shared blocks: the base layer runs once for the batch.

A stage's target projections (q/k/v/o, gate/up/down) become `LoraLinear`s (same weights and
names). Before a batched forward the engine has the stage's `LoraHooks` plan the step: the
batch is ordered so each adapter's rows are consecutive, and for each layer and projection the
runs of rows of the blocks targeting it become the groups of two grouped matmuls adding
`(x[rows] A^T) (s B)^T` to the projection's output rows (worker/lora_delta.py): a fixed few ops
per projection per step, no loop over adapters, tokens or requests, and the base weights are
never touched (no merge). This is PEFT's `result + lora_B(lora_A(x)) * scaling` for exactly
the rows of that adapter's requests.

Adapter weights live in `AdapterCache`, keyed by adapter block id and refcounted by the requests
using them (a request holds its adapter blocks from its first item to its release); a block no
request holds stays resident, least recently used first out, up to `idle_limit` blocks.
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

from blockllm.worker.errors import BadRequest
from blockllm.worker.lora_delta import LoraStep, StackCache, plan_step

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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


class AdapterCache:
    """Adapter blocks by id, refcounted by request; idle ones kept (LRU) up to `idle_limit`."""

    def __init__(
        self, loader: Callable[[str], dict[str, torch.Tensor]], idle_limit: int = 256
    ) -> None:
        self._loader = loader
        self.idle_limit = idle_limit
        self._weights: dict[str, AdapterWeights] = {}
        self._refs: dict[str, int] = {}
        self._held: dict[str, tuple[str, ...]] = {}  # request id -> blocks it holds
        self._idle: OrderedDict[str, None] = OrderedDict()
        self._positions: dict[str, set[int]] = {}  # block -> chain positions it was used at
        self.loads = 0

    def admit(
        self,
        request_id: str,
        pairs: Sequence[tuple[int, str]],
        stages: Sequence[tuple[int, Any]],
    ) -> AdapterMap:
        """A work item's (position, block id) pairs checked against the decoder layers of its
        stages (`stages`: (start position, StageModel) each) and held for the request from now
        on; returns them by position. Raises BadRequest (a position that is no decoder layer
        there, a bad id, a block whose modules the layer lacks, a block the zoo cannot give)."""
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
            odd = hooks.unknown(j, self._weights[bid])
            if odd:
                self.release(request_id)
                raise BadRequest(f"adapter block {bid[:12]} targets {odd}, absent from the layer")
            self._positions.setdefault(bid, set()).add(pos)
        return AdapterMap(out, (m for b in out.values() for m in self._weights[b]))

    def per_span(self, spans: dict[str, tuple[int, int]]) -> dict[str, int]:
        """Key -> resident blocks used at a chain position in its [start, end) span."""
        used = [self._positions.get(b, set()) for b in self._weights]
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
            if bid not in self._weights:
                tensors = self._loader(bid)
                self._weights[bid] = adapter_weights(tensors)
                self._refs[bid] = 0
                self.loads += 1
                logger.debug("[lora] loaded adapter block %s", bid[:12])
        for bid in new:
            self._refs[bid] += 1
            self._idle.pop(bid, None)
        if new:
            self._held[request_id] = (*held, *new)

    def release(self, request_id: str) -> None:
        for bid in self._held.pop(request_id, ()):
            self._refs[bid] -= 1
            if self._refs[bid] == 0:
                self._idle[bid] = None
        while len(self._idle) > self.idle_limit:
            bid, _ = self._idle.popitem(last=False)
            del self._weights[bid], self._refs[bid]
            self._positions.pop(bid, None)
            logger.debug("[lora] dropped idle adapter block %s", bid[:12])

    def has(self, block_id: str) -> bool:
        return block_id in self._weights

    def insert(self, block_id: str, tensors: dict[str, torch.Tensor]) -> None:
        """A block read elsewhere (the loader thread) made resident, held by no request yet
        (idle: the next `release` may drop it if over the limit). Raises BadRequest."""
        if block_id in self._weights:
            return
        self._weights[block_id] = adapter_weights(tensors)
        self._refs[block_id] = 0
        self._idle[block_id] = None
        self.loads += 1

    def weights(self, block_id: str) -> AdapterWeights:
        return self._weights[block_id]

    def resident(self) -> tuple[str, ...]:
        return tuple(self._weights)

    def refs(self, block_id: str) -> int:
        return self._refs.get(block_id, 0)

    @property
    def total_bytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size()
            for w in self._weights.values()
            for a, b, _ in w.values()
        )


class AdapterMap(dict[int, str]):
    """A request's adapter blocks by chain position, with `key` (the blocks, hashable) and
    `order` (targeted modules, then blocks): sorting a batch by `order` makes the rows of one
    adapter consecutive, and those of adapters with the same targets neighbours."""

    __slots__ = ("key", "order")

    def __init__(self, blocks: dict[int, str] | None = None, targets: Iterable[str] = ()) -> None:
        super().__init__(blocks or {})
        self.key: tuple[tuple[int, str], ...] = tuple(sorted(self.items()))
        self.order: tuple = (tuple(sorted(set(targets))), self.key) if self else ()


class LoraLinear(nn.Linear):
    """A target projection of a stage: its Linear, plus the current step's delta for it if
    any (set on an existing nn.Linear by `LoraHooks`, weights and names unchanged; no hook)."""

    lora_hooks: LoraHooks
    lora_key: tuple[int, str]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        step = self.lora_hooks.step
        if step is not None:
            delta = step.modules.get(self.lora_key)
            if delta is not None:  # x [1, N, in], out [1, N, out] -> flat views
                delta.apply(x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1]))
        return out


class LoraHooks:
    """The target projections of a stage's decoder layers (made `LoraLinear`s) and the delta
    plan of the forward running now (`prepare` before it, `finish` after; None = no adapter in
    the batch). The last plan is kept and reused while the batch keeps its shape."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.step: LoraStep | None = None
        self.modules: dict[int, dict[str, nn.Module]] = {}
        for j, layer in enumerate(layers):
            for name, mod in layer.named_modules():
                if type(mod) is nn.Linear and name.rpartition(".")[2] in LORA_TARGETS:
                    self.modules.setdefault(j, {})[name] = mod
                    mod.__class__ = LoraLinear  # as torch.nn.utils.parametrize does
                    mod.lora_hooks, mod.lora_key = self, (j, name)
        self.stacks = StackCache()
        # the last few plans by batch shape (micro-batch groups alternate: worker/groups.py)
        self._plans: OrderedDict[tuple, LoraStep | None] = OrderedDict()

    def unknown(self, j: int, weights: AdapterWeights) -> list[str]:
        """Modules of an adapter block that layer `j` of the stage has no target for."""
        return sorted(set(weights) - set(self.modules.get(j, {})))

    def prepare(
        self,
        first_position: int,
        maps: Sequence[AdapterMap],
        lengths: Sequence[int],
        cache: AdapterCache,
        device: torch.device,
    ) -> None:
        """Plan the deltas of a forward of entries with these adapter maps (AdapterMap) and
        row counts, the rows in this order; layer j of the stage is chain position
        `first_position + j`."""
        if not any(maps):
            self.step = None
            return
        key = tuple((m.key, n) for m, n in zip(maps, lengths, strict=True))
        if key in self._plans:
            self._plans.move_to_end(key)
            self.step = self._plans[key]
            return
        self.step = plan_step(
            first_position, self.modules, maps, lengths, cache.weights, self.stacks, device
        )
        self._plans[key] = self.step
        while len(self._plans) > PLANS_KEPT:
            self._plans.popitem(last=False)

    def finish(self) -> None:
        self.step = None
