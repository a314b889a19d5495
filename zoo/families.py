"""Supported architectures: the explicit HF key map, expected shapes and family fingerprints.

A chain is `[embed, layer 0, ..., layer L-1, head]` (docs/internals.md). Every tensor of a
checkpoint maps to exactly one (chain position, relative name) with a shape derived from the
config; nothing is matched by pattern and skipped.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from blockllm.zoo.errors import CheckpointError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# non-persistent rotary buffers some old checkpoints still carry: recomputed from the config
IGNORED_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
# config keys that decide what a block computes: two checkpoints with equal values are a family
_FINGERPRINT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "hidden_act",
    "rms_norm_eps",
    "attention_bias",
    "mlp_bias",
    "partial_rotary_factor",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One expected tensor: its HF key, its name inside the block, its shape."""

    hf_key: str
    rel: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Layout:
    """Expected tensors per chain position of one checkpoint config."""

    model_type: str
    num_layers: int
    tie_word_embeddings: bool
    positions: tuple[tuple[TensorSpec, ...], ...]

    def specs(self) -> dict[str, tuple[int, TensorSpec]]:
        """HF key -> (chain position, spec)."""
        return {s.hf_key: (p, s) for p, specs in enumerate(self.positions) for s in specs}


def position_name(position: int, num_layers: int) -> str:
    """ "embed", "layer 3" or "head" for a chain position."""
    if position == 0:
        return "embed"
    if position == num_layers + 1:
        return "head"
    return f"layer {position - 1}"


def _int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"config.json: {key!r} must be a positive integer, got {value!r}")
    return value


def check_supported(config: dict[str, Any]) -> str:
    """The model_type if this config is a supported causal LM; else UnsupportedModelError."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    archs = config.get("architectures") or []
    if archs and not any(str(a).endswith("ForCausalLM") for a in archs):
        raise UnsupportedModelError(
            f"architectures {archs} is not supported: only *ForCausalLM checkpoints"
        )
    if config.get("quantization_config"):
        raise UnsupportedModelError("quantized checkpoints (quantization_config) are not supported")
    return model_type


def dims(config: dict[str, Any]) -> dict[str, int]:
    """Shape-defining sizes with HF's defaults applied (head_dim, num_key_value_heads)."""
    d = {
        k: _int(config, k)
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
    }
    d["num_key_value_heads"] = _int(config, "num_key_value_heads", d["num_attention_heads"])
    head_dim = config.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    d["head_dim"] = _int({"head_dim": head_dim}, "head_dim")
    if d["num_attention_heads"] % d["num_key_value_heads"]:
        raise CheckpointError(
            "config.json: num_attention_heads must be a multiple of num_key_value_heads"
        )
    return d


def _layer_specs(i: int, model_type: str, config: dict[str, Any], d: dict[str, int]):
    h, q, kv, inter = (
        d["hidden_size"],
        d["num_attention_heads"] * d["head_dim"],
        d["num_key_value_heads"] * d["head_dim"],
        d["intermediate_size"],
    )
    attn_bias = model_type == "llama" and bool(config.get("attention_bias"))
    mlp_bias = model_type == "llama" and bool(config.get("mlp_bias"))
    rel: list[tuple[str, tuple[int, ...]]] = [
        ("input_layernorm.weight", (h,)),
        ("post_attention_layernorm.weight", (h,)),
        ("self_attn.q_proj.weight", (q, h)),
        ("self_attn.k_proj.weight", (kv, h)),
        ("self_attn.v_proj.weight", (kv, h)),
        ("self_attn.o_proj.weight", (h, q)),
        ("mlp.gate_proj.weight", (inter, h)),
        ("mlp.up_proj.weight", (inter, h)),
        ("mlp.down_proj.weight", (h, inter)),
    ]
    if model_type == "qwen2" or attn_bias:
        rel += [
            ("self_attn.q_proj.bias", (q,)),
            ("self_attn.k_proj.bias", (kv,)),
            ("self_attn.v_proj.bias", (kv,)),
        ]
    if attn_bias:
        rel.append(("self_attn.o_proj.bias", (h,)))
    if mlp_bias:
        rel += [
            ("mlp.gate_proj.bias", (inter,)),
            ("mlp.up_proj.bias", (inter,)),
            ("mlp.down_proj.bias", (h,)),
        ]
    return tuple(TensorSpec(f"model.layers.{i}.{name}", name, shape) for name, shape in rel)


def layout(config: dict[str, Any]) -> Layout:
    """The full expected key map of a checkpoint with this config.json."""
    model_type = check_supported(config)
    d = dims(config)
    tie = bool(config.get("tie_word_embeddings", False))
    h, vocab, n = d["hidden_size"], d["vocab_size"], d["num_hidden_layers"]
    embed = (TensorSpec("model.embed_tokens.weight", "embed_tokens.weight", (vocab, h)),)
    head = [TensorSpec("model.norm.weight", "norm.weight", (h,))]
    if not tie:
        head.append(TensorSpec("lm_head.weight", "lm_head.weight", (vocab, h)))
    layers = tuple(_layer_specs(i, model_type, config, d) for i in range(n))
    return Layout(model_type, n, tie, (embed, *layers, tuple(head)))


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """Rope settings normalised across the v4 (rope_theta/rope_scaling) and v5 layouts."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    return rope


def fingerprint(config: dict[str, Any]) -> str:
    """Family id: sha256 of model_type, the shape-defining keys and the rope parameters."""
    model_type = check_supported(config)
    fields: dict[str, Any] = {"model_type": model_type, **dims(config)}
    for key in _FINGERPRINT_KEYS:
        fields.setdefault(key, config.get(key))
    fields["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    fields["rope"] = _rope(config)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
