"""LoRA adapters applied per request on shared blocks: the base layer runs once for the batch.

A stage's target projections (q/k/v/o, gate/up/down) get a forward hook. Before a batched
forward the engine sets the stage's `LoraStep`: for each decoder layer of the stage, the groups
of batch rows that share one adapter block (rows = the flattened new tokens of the requests
using it) and that block's weights. The hook adds, per group, `(x[rows] A^T) B^T * scaling` to
the projection's output rows (`index_add_`): gathered matmuls, one pair per adapter per module,
no loop over tokens or requests, and the base weights are never touched (no merge). This is
PEFT's `result + lora_B(lora_A(x)) * scaling` for exactly the rows of that adapter's requests.

Adapter weights live in `AdapterCache`, keyed by adapter block id and refcounted by the requests
using them (a request holds its adapter blocks from its first item to its release); a block no
request holds stays resident, least recently used first out, up to `idle_limit` blocks.
Compute-thread only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blockllm.worker.errors import BadRequest

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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
    ) -> dict[int, str]:
        """A work item's (position, block id) pairs checked against the decoder layers of its
        stages (`stages`: (start position, StageModel) each) and held for the request from now
        on; returns them by position. Raises BadRequest (a position that is no decoder layer
        there, a bad id, a block whose modules the layer lacks, a block the zoo cannot give)."""
        from blockllm.zoo.errors import ZooError
        from blockllm.zoo.store import check_block_id

        if not pairs:
            return {}
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
        return out

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


@dataclass(slots=True)
class LoraStep:
    """Per decoder layer of a stage (index within the stage), the (rows, weights) groups of
    one batched forward: rows [n] int64 of the flattened batch that use those weights."""

    layers: dict[int, list[tuple[torch.Tensor, AdapterWeights]]] = field(default_factory=dict)


def plan_lora(
    first_position: int,
    n_layers: int,
    adapters: Sequence[dict[int, str]],
    lengths: Sequence[int],
    cache: AdapterCache,
    device: torch.device,
) -> LoraStep | None:
    """The LoraStep of a batch: entry i has `lengths[i]` rows and adapter blocks by chain
    position `adapters[i]`; layer j of the stage is chain position `first_position + j`.
    None when no entry has an adapter block in these layers."""
    if not any(adapters):
        return None
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    rows_of: dict[tuple[int, ...], torch.Tensor] = {}
    step = LoraStep()
    for j in range(n_layers):
        groups: dict[str, list[int]] = {}
        for i, amap in enumerate(adapters):
            bid = amap.get(first_position + j)
            if bid is not None:
                groups.setdefault(bid, []).append(i)
        for bid, members in groups.items():
            key = tuple(members)
            if key not in rows_of:  # requests in a group share rows in every layer
                rows_of[key] = torch.cat(
                    [torch.arange(offsets[i], offsets[i + 1]) for i in members]
                ).to(device)
            step.layers.setdefault(j, []).append((rows_of[key], cache.weights(bid)))
    return step if step.layers else None


class LoraHooks:
    """Forward hooks on the target projections of a stage's decoder layers, reading `step`
    (set by the engine around one batched forward; None = no adapter in the batch)."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.step: LoraStep | None = None
        self.modules: dict[int, dict[str, nn.Module]] = {}
        for j, layer in enumerate(layers):
            for name, mod in layer.named_modules():
                if isinstance(mod, nn.Linear) and name.rpartition(".")[2] in LORA_TARGETS:
                    self.modules.setdefault(j, {})[name] = mod
                    mod.register_forward_hook(self._hook(j, name))

    def unknown(self, j: int, weights: AdapterWeights) -> list[str]:
        """Modules of an adapter block that layer `j` of the stage has no target for."""
        return sorted(set(weights) - set(self.modules.get(j, {})))

    def _hook(self, j: int, name: str) -> Callable:
        def hook(_mod: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
            step = self.step
            if step is None or j not in step.layers:
                return None
            x = inputs[0]
            flat_x = x.reshape(-1, x.shape[-1])  # [1, N, in] -> [N, in]
            flat_out = out.view(-1, out.shape[-1])  # [1, N, out] -> [N, out] (a view)
            for rows, weights in step.layers[j]:
                w = weights.get(name)
                if w is None:
                    continue
                a, b, scaling = w
                xs = flat_x.index_select(0, rows).to(a.dtype)  # [n, in]
                delta = F.linear(F.linear(xs, a), b) * scaling  # [n, r] -> [n, out]
                flat_out.index_add_(0, rows, delta.to(flat_out.dtype))
            return out

        return hook
