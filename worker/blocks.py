"""One generic block runner for every supported family, behind our own narrow interface.

The layer math is HF's own. For a checkpoint's config we build its `*ForCausalLM` once on the
meta device (`blockllm.zoo.families.build_skeleton`: no parameter memory, non-persistent
buffers such as rotary frequencies made real by the class's own init) and copy out of it the
modules a stage runs: the input embedding (Gemma's scaled one included), a learned position
embedding where there is one (GPT-2), the decoder layers, the rotary embedding, the final norm
and lm_head. Each copy gets the cached block tensors with `load_state_dict(strict=True,
assign=True)`, so a module's parameters ARE the block's tensors: no copy, no double memory. We
never subclass HF modules; which module is which comes from the zoo's key map (`Layout`), and
what a family's `forward` does between them from its declared `Traits` (embedding multiplier,
logit divisor / soft-cap, learned positions). Attention runs through the "blockllm" attention
function (worker/attention.py) that the layers' config names. Weights come from the zoo through
`BlockCache`, keyed by block id and refcounted, so two stages that share a block share it.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from blockllm.worker.attention import ATTN_IMPLEMENTATION, STEP_KWARG, PagedCacheView, StepBatch
from blockllm.worker.errors import BadRequest
from blockllm.worker.kv_cache import KVGeometry
from blockllm.worker.lora import LoraHooks
from blockllm.zoo.errors import ZooError
from blockllm.zoo.families import (
    FAMILIES,
    Layout,
    Traits,
    build_skeleton,
    hf_config,
    layout,
    postprocess_logits,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """What the stages of one checkpoint family are built from: the HF config (attention
    "blockllm"), the meta skeleton the modules are copied from, the key map and the traits."""

    model_type: str
    config: Any  # a transformers PretrainedConfig with _attn_implementation = "blockllm"
    layout: Layout
    traits: Traits
    skeleton: nn.Module  # the *ForCausalLM on the meta device (buffers real, on the CPU)

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    @property
    def base(self) -> nn.Module:
        return getattr(self.skeleton, self.layout.prefix)

    def layer(self, i: int) -> nn.Module:
        return self.base.get_submodule(self.layout.layers)[i]

    @property
    def head_dim(self) -> int:
        c = self.config
        return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        c = self.config
        return int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)

    def kv_geometry(self, dtype: torch.dtype, device: torch.device) -> KVGeometry:
        return KVGeometry(self.num_kv_heads, self.head_dim, dtype, device)

    def layer_windows(self) -> tuple[int | None, ...]:
        """Per decoder layer, the sliding window its attention uses (None = all keys): for
        a KV cache that keeps only the window. Today every layer keeps full-length KV and
        the window is applied by masking (worker/attention.py), which is exact."""
        out = []
        for i in range(self.num_layers):
            attn = getattr(self.layer(i), "self_attn", None) or getattr(self.layer(i), "attn", None)
            if attn is not None and hasattr(attn, "sliding_window"):
                out.append(attn.sliding_window)  # per layer type (Qwen2/3, Gemma 2/3)
            else:  # Mistral, Phi-3 pass config.sliding_window to every layer
                out.append(getattr(self.config, "sliding_window", None))
        return tuple(out)

    @property
    def max_positions(self) -> int | None:
        """The position limit of a learned position embedding (GPT-2's n_positions)."""
        if self.layout.position_embed is None:
            return None
        return int(self.base.get_submodule(self.layout.position_embed).num_embeddings)


def resolve_family(model_type: str, config: dict[str, Any]) -> Family:
    """The family of a checkpoint config.json; BadRequest for an unsupported one."""
    try:
        lay = layout(config)
        cfg = hf_config(config, ATTN_IMPLEMENTATION)
        skeleton = build_skeleton(cfg)
    except ZooError as e:
        raise BadRequest(f"model_type {model_type!r}: {e}") from e
    if lay.model_type != model_type:
        raise BadRequest(f"manifest model_type {model_type!r} != config {lay.model_type!r}")
    return Family(model_type, cfg, lay, FAMILIES[model_type], skeleton)


Loader = Callable[[str], dict[str, torch.Tensor]]


class BlockCache:
    """Loaded block tensors keyed by block id, refcounted: a shared block is loaded once.

    `acquire` loads through `loader` (the zoo, hashes verified) on first use; `release` drops
    the tensors when the last user lets go. Compute-thread only.
    """

    def __init__(self, loader: Loader) -> None:
        self._loader = loader
        self._blocks: dict[str, dict[str, torch.Tensor]] = {}
        self._refs: dict[str, int] = {}
        self._nbytes: dict[str, int] = {}  # block id -> its tensors' bytes
        self._total = 0  # of every held block (read with every heartbeat's facts)

    def acquire(self, block_id: str) -> dict[str, torch.Tensor]:
        if block_id not in self._blocks:
            tensors = self._loader(block_id)
            for t in tensors.values():
                t.requires_grad_(False)
            self._blocks[block_id] = tensors
            self._refs[block_id] = 0
            self._nbytes[block_id] = sum(t.numel() * t.element_size() for t in tensors.values())
            self._total += self._nbytes[block_id]
            logger.debug("[blocks] loaded %s (%d bytes)", block_id[:12], self.nbytes(block_id))
        self._refs[block_id] += 1
        return self._blocks[block_id]

    def release(self, block_id: str) -> None:
        self._refs[block_id] -= 1
        if self._refs[block_id] == 0:
            del self._refs[block_id], self._blocks[block_id]
            self._total -= self._nbytes.pop(block_id)
            logger.debug("[blocks] freed %s", block_id[:12])

    def nbytes(self, block_id: str) -> int:
        return self._nbytes[block_id]

    def __contains__(self, block_id: str) -> bool:
        return block_id in self._blocks

    def refs(self, block_id: str) -> int:
        return self._refs.get(block_id, 0)

    @property
    def total_bytes(self) -> int:
        return self._total


def _sub(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors of module `name` in a block, relative to that module."""
    prefix = f"{name}."
    return {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}


def _build(
    family: Family, src: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device
) -> nn.Module:
    """A copy of skeleton module `src` whose parameters are exactly `tensors` (strict names,
    no copy of the data); its buffers (rotary frequencies, embedding scale) moved to `device`."""
    module = copy.deepcopy(src, memo={id(family.config): family.config})
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise BadRequest(f"block does not fit {type(src).__name__}: {e}") from e
    for sub in module.modules():
        for name, b in sub._buffers.items():
            if b is not None:
                sub._buffers[name] = b.to(device)
    return module.eval().requires_grad_(False)


class StageModel:
    """The computation of chain positions [start, end) of one family: embed, layers, head.

    Tensors in and out are flattened over the batch: hidden states are [N, D].
    """

    def __init__(
        self,
        family: Family,
        start: int,
        end: int,
        blocks: dict[int, dict[str, torch.Tensor]],
        tied_embed: dict[str, torch.Tensor] | None,
        device: torch.device,
    ) -> None:
        n = family.num_layers
        self.family, self.start, self.end = family, start, end
        self.token_embed: nn.Module | None = None
        self.position_embed: nn.Module | None = None
        self.layers: list[nn.Module] = []
        self.layer_types: list[str | None] = []
        self.norm: nn.Module | None = None
        self.lm_head: nn.Module | None = None
        self.rotary: nn.Module | None = None
        base = family.base
        for pos in range(start, end):
            tensors = blocks[pos]
            if pos == 0:
                self._build_embed(tensors, device)
            elif pos <= n:
                self.layers.append(_build(family, family.layer(pos - 1), tensors, device))
                types = getattr(family.config, "layer_types", None)
                self.layer_types.append(types[pos - 1] if types else None)
            else:
                self._build_head(tensors, tied_embed, device)
        # per-request LoRA deltas on the target projections (worker/lora.py)
        self.lora = LoraHooks(self.layers)
        ref = next(iter(blocks[start].values()))
        self.dtype: torch.dtype = ref.dtype
        self.device = device
        rotary = next((m for m in base.children() if "Rotary" in type(m).__name__), None)
        if self.layers and rotary is not None:
            self.rotary = _build(family, rotary, {}, device)
        # Gemma 3: one rotary per layer type (local / global rope), chosen per layer
        self._rotary_by_type = self.rotary is not None and "layer_type" in (
            inspect.signature(self.rotary.forward).parameters
        )

    def _build_embed(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        lay, base = self.family.layout, self.family.base
        names = [lay.token_embed] + ([lay.position_embed] if lay.position_embed else [])
        extra = set(tensors) - {k for k in tensors if k.split(".", 1)[0] in names}
        if extra:
            raise BadRequest(f"embed block has unexpected tensors {sorted(extra)}")
        src = base.get_submodule(lay.token_embed)
        self.token_embed = _build(self.family, src, _sub(tensors, lay.token_embed), device)
        if lay.position_embed:
            src = base.get_submodule(lay.position_embed)
            sub = _sub(tensors, lay.position_embed)
            self.position_embed = _build(self.family, src, sub, device)

    def _build_head(
        self,
        tensors: dict[str, torch.Tensor],
        tied: dict[str, torch.Tensor] | None,
        device: torch.device,
    ) -> None:
        fam, lay = self.family, self.family.layout
        norm_tensors = _sub(tensors, lay.norm)
        head_tensors = _sub(tensors, lay.lm_head)
        if len(norm_tensors) + len(head_tensors) != len(tensors):
            raise BadRequest(f"head block has tensors {sorted(tensors)}")
        if tied is not None:
            if head_tensors:
                raise BadRequest(f"tied head block has tensors {sorted(tensors)}")
            if lay.tied_rel not in tied:
                raise BadRequest(f"tied embedding block lacks {lay.tied_rel!r}")
            head_tensors = {"weight": tied[lay.tied_rel]}
        self.norm = _build(fam, fam.base.get_submodule(lay.norm), norm_tensors, device)
        src = fam.skeleton.get_submodule(lay.lm_head)
        self.lm_head = _build(fam, src, head_tensors, device)

    @property
    def embed_weight(self) -> torch.Tensor | None:
        """The token embedding's tensor (shared with a tied head)."""
        return None if self.token_embed is None else self.token_embed.weight

    @property
    def needs_positions(self) -> bool:
        """Whether `embed` needs each token's absolute position (learned positions)."""
        return self.position_embed is not None

    @property
    def max_positions(self) -> int | None:
        """Positions a learned position embedding has (GPT-2's n_positions), else None."""
        return None if self.position_embed is None else int(self.position_embed.num_embeddings)

    @property
    def layer0(self) -> int:
        """HF layer index of the first decoder layer (meaningful when there are layers)."""
        return max(self.start - 1, 0)

    @property
    def has_head(self) -> bool:
        return self.norm is not None

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [N] int64 (and their absolute positions [N]) -> hidden [N, D]."""
        assert self.token_embed is not None
        h = self.token_embed(tokens)  # Gemma's module scales by sqrt(hidden) itself
        traits = self.family.traits
        if traits.embed_multiplier is not None:  # Granite
            h = h * getattr(self.family.config, traits.embed_multiplier)
        if self.position_embed is not None:  # GPT-2: token + learned absolute position
            assert positions is not None, "learned positions need each token's position"
            h = h + self.position_embed(positions)
        return h

    def _position_embeddings(self, x: torch.Tensor, positions: torch.Tensor, count: int) -> list:
        """Per layer of the run, the rotary (cos, sin) it takes, or None (learned positions)."""
        if self.rotary is None:
            return [None] * count
        if not self._rotary_by_type:
            pe = self.rotary(x, positions)
            return [pe] * count
        by_type: dict[str | None, Any] = {}
        for t in self.layer_types[:count]:
            if t not in by_type:
                by_type[t] = self.rotary(x, positions, t)
        return [by_type[t] for t in self.layer_types[:count]]

    def run_layers(
        self, h: torch.Tensor, batch: StepBatch, count: int | None = None
    ) -> torch.Tensor:
        """hidden [N, D] through the stage's decoder layers (the first `count` of them), KV
        written into the pool."""
        layers = self.layers if count is None else self.layers[:count]
        x = h[None]  # [N, D] -> [1, N, D]: the whole batch as one ragged sequence
        # positions: [N] -> [1, N]; cos, sin: [1, N, Dh] from per-token absolute positions
        pos_emb = self._position_embeddings(x, batch.positions[None], len(layers))
        cache = PagedCacheView(batch)
        step = {STEP_KWARG: batch}
        for layer, pe in zip(layers, pos_emb, strict=True):
            kw = {} if pe is None else {"position_embeddings": pe}
            x = layer(x, attention_mask=None, past_key_values=cache, **kw, **step)
        return x[0]  # [1, N, D] -> [N, D]

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        """Last hidden state per request [B, D] -> logits [B, V] (final norm + lm_head + what
        the family does to logits: Granite's divisor, Gemma's soft-cap)."""
        assert self.norm is not None and self.lm_head is not None
        logits = self.lm_head(self.norm(h_last))
        return postprocess_logits(self.family.traits, self.family.config, logits)
