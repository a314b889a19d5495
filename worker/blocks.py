"""Per-family adapters around the HF module classes, behind our own narrow interface.

The layer math is HF's own: for a checkpoint's `model_type` we look up its `*ForCausalLM` class
in transformers' model-type mapping and take the `*DecoderLayer`, `*RMSNorm` and
`*RotaryEmbedding` classes from the same module. We build them from the config (on the meta
device, then `load_state_dict(strict=True, assign=True)`, so a module's parameters ARE the
cached block tensors: no copy, no double memory), never subclass them, and convert at this
boundary once. Weights come from the zoo through `BlockCache`, keyed by block id and
refcounted, so two stages that share a block share its memory.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from blockllm.worker.attention import ATTN_IMPLEMENTATION, STEP_KWARG, PagedCacheView, StepBatch
from blockllm.worker.errors import BadRequest
from blockllm.worker.kv_cache import KVGeometry

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class Family:
    """The HF classes and the config our modules of one checkpoint family are built from."""

    model_type: str
    config: Any  # a transformers PretrainedConfig with _attn_implementation = "blockllm"
    decoder_layer: type[nn.Module]
    rms_norm: type[nn.Module]
    rotary: type[nn.Module]

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def head_dim(self) -> int:
        c = self.config
        return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    def kv_geometry(self, dtype: torch.dtype, device: torch.device) -> KVGeometry:
        return KVGeometry(int(self.config.num_key_value_heads), self.head_dim, dtype, device)


def resolve_family(model_type: str, config: dict[str, Any]) -> Family:
    """The family of a checkpoint config.json; BadRequest for an unsupported model type."""
    if (
        model_type not in SUPPORTED_MODEL_TYPES
        or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        raise BadRequest(f"model_type {model_type!r} is not supported by the stage engine")
    cfg = CONFIG_MAPPING[model_type].from_dict(dict(config))
    cfg._attn_implementation = ATTN_IMPLEMENTATION
    lm_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]  # e.g. "LlamaForCausalLM"
    prefix = lm_name.removesuffix("ForCausalLM")
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return Family(
        model_type=model_type,
        config=cfg,
        decoder_layer=getattr(module, f"{prefix}DecoderLayer"),
        rms_norm=getattr(module, f"{prefix}RMSNorm"),
        rotary=getattr(module, f"{prefix}RotaryEmbedding"),
    )


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

    def acquire(self, block_id: str) -> dict[str, torch.Tensor]:
        if block_id not in self._blocks:
            tensors = self._loader(block_id)
            for t in tensors.values():
                t.requires_grad_(False)
            self._blocks[block_id] = tensors
            self._refs[block_id] = 0
            logger.debug("[blocks] loaded %s (%d bytes)", block_id[:12], self.nbytes(block_id))
        self._refs[block_id] += 1
        return self._blocks[block_id]

    def release(self, block_id: str) -> None:
        self._refs[block_id] -= 1
        if self._refs[block_id] == 0:
            del self._refs[block_id], self._blocks[block_id]
            logger.debug("[blocks] freed %s", block_id[:12])

    def nbytes(self, block_id: str) -> int:
        return sum(t.numel() * t.element_size() for t in self._blocks[block_id].values())

    def __contains__(self, block_id: str) -> bool:
        return block_id in self._blocks

    def refs(self, block_id: str) -> int:
        return self._refs.get(block_id, 0)

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(b) for b in self._blocks)


def _build(cls: type[nn.Module], tensors: dict[str, torch.Tensor], *args: Any) -> nn.Module:
    """An HF module whose parameters are exactly `tensors` (strict names, no copy)."""
    with torch.device("meta"):
        module = cls(*args)
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise BadRequest(f"block does not fit {cls.__name__}: {e}") from e
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
        cfg = family.config
        self.family, self.start, self.end = family, start, end
        self.embed_weight: torch.Tensor | None = None
        self.layers: list[nn.Module] = []
        self.norm: nn.Module | None = None
        self.lm_head_weight: torch.Tensor | None = None
        self.rotary: nn.Module | None = None
        for pos in range(start, end):
            tensors = blocks[pos]
            if pos == 0:
                self.embed_weight = _only(tensors, "embed_tokens.weight")
            elif pos <= n:
                self.layers.append(_build(family.decoder_layer, tensors, cfg, pos - 1))
            else:
                self._build_head(tensors, tied_embed)
        ref = next(iter(blocks[start].values()))
        self.dtype: torch.dtype = ref.dtype
        self.device = device
        if self.layers:
            self.rotary = family.rotary(cfg).to(device)

    def _build_head(self, tensors: dict[str, torch.Tensor], tied: dict[str, torch.Tensor] | None):
        cfg = self.family.config
        norm_tensors = {"weight": tensors["norm.weight"]} if "norm.weight" in tensors else {}
        self.norm = _build(self.family.rms_norm, norm_tensors, cfg.hidden_size, cfg.rms_norm_eps)
        if tied is not None:
            if set(tensors) != {"norm.weight"}:
                raise BadRequest(f"tied head block has tensors {sorted(tensors)}")
            self.lm_head_weight = _only(tied, "embed_tokens.weight")
        else:
            if set(tensors) != {"norm.weight", "lm_head.weight"}:
                raise BadRequest(f"head block has tensors {sorted(tensors)}")
            self.lm_head_weight = tensors["lm_head.weight"]

    @property
    def layer0(self) -> int:
        """HF layer index of the first decoder layer (meaningful when there are layers)."""
        return max(self.start - 1, 0)

    @property
    def has_head(self) -> bool:
        return self.norm is not None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N] int64 -> hidden [N, D]."""
        assert self.embed_weight is not None
        return F.embedding(tokens, self.embed_weight)

    def run_layers(self, h: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """hidden [N, D] through the stage's decoder layers (KV written into the pool)."""
        assert self.rotary is not None
        x = h[None]  # [N, D] -> [1, N, D]: the whole batch as one ragged sequence
        # positions: [N] -> [1, N]; cos, sin: [1, N, Dh] from per-token absolute positions
        pos_emb = self.rotary(x, batch.positions[None])
        cache = PagedCacheView(batch)
        kwargs = {STEP_KWARG: batch}
        for layer in self.layers:
            x = layer(x, None, position_embeddings=pos_emb, past_key_values=cache, **kwargs)
        return x[0]  # [1, N, D] -> [N, D]

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        """Last hidden state per request [B, D] -> logits [B, V] (final norm + lm_head)."""
        assert self.norm is not None and self.lm_head_weight is not None
        return F.linear(self.norm(h_last), self.lm_head_weight)


def _only(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if set(tensors) != {name}:
        raise BadRequest(f"expected a block with only {name!r}, got {sorted(tensors)}")
    return tensors[name]
