"""Supported architectures: one generic key map derived from the HF model class, plus a small
declared difference set per family.

A chain is `[embed, layer 0, ..., layer L-1, head]` (docs/internals.md). For a checkpoint's
config we instantiate its `*ForCausalLM` on the meta device (no memory, no init) and read the
structure off it: the base model (`base_model_prefix`), its input embedding, the ModuleList of
`num_hidden_layers` decoder layers, the one remaining module with parameters (the final norm),
a learned position embedding where there is one, and the output embedding (`lm_head`). Every
tensor of its `state_dict` then maps to exactly one (chain position, relative name) with the
shape the class gives it; nothing is matched by pattern and skipped. So q/k norms, fused
projections, post-attention norms, biases, Conv1D weights and `head_dim != hidden / heads` need
no table: the class says what a block holds.

What the class does NOT say is what its `forward` does between those modules; that is the
declared difference set (`Traits`): a multiplier on the embedding output, a divisor or a
soft-cap on the logits, learned absolute positions. A model_type without declared traits, or a
config feature the generic path cannot serve (`refuse`, `_check_rope`), is refused at import
with a message naming it. `fingerprint` stays torch-free (the broker computes stage keys).

Learned absolute positions (GPT-2's `wpe`) live in the embed block, next to the token
embedding: the chain stays `num_hidden_layers + 2` blocks for every family, and the position
of each new token is known where tokens enter (past_len + i).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from blockllm.zoo.errors import CheckpointError, UnsupportedModelError


@dataclass(frozen=True, slots=True)
class Refusal:
    """A config feature the generic path cannot serve: refused when `key` is truthy."""

    key: str
    feature: str


@dataclass(frozen=True, slots=True)
class Traits:
    """What a family's `forward` does outside the modules it is built from (config key names),
    and what its projections are to a LoRA adapter."""

    embed_multiplier: str | None = None  # embedding output * config[key] (Granite)
    logits_divisor: str | None = None  # logits / config[key] (Granite logits_scaling)
    logits_softcap: str | None = None  # cap * tanh(logits / cap) when set (Gemma 2/3)
    learned_positions: bool = False  # token embedding + position embedding (GPT-2 wte + wpe)
    refuse: tuple[Refusal, ...] = ()
    conv1d: bool = False  # its projections are Conv1D: weight [in, out], not [out, in] (GPT-2)
    # the projections an adapter targets unless told: query and value, or the fused module
    # that holds them (Phi-3 qkv_proj, GPT-2 c_attn)
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")


# The declared difference sets. Everything else is read off the HF class (see module doc).
FAMILIES: dict[str, Traits] = {
    "llama": Traits(),
    "mistral": Traits(),
    "qwen2": Traits(),
    "qwen3": Traits(),
    "gemma2": Traits(logits_softcap="final_logit_softcapping"),
    "gemma3_text": Traits(
        logits_softcap="final_logit_softcapping",
        refuse=(Refusal("use_bidirectional_attention", "bidirectional attention"),),
    ),
    "phi3": Traits(lora_targets=("qkv_proj",)),
    "olmo2": Traits(),
    "granite": Traits(embed_multiplier="embedding_multiplier", logits_divisor="logits_scaling"),
    "gpt2": Traits(
        learned_positions=True,
        conv1d=True,
        lora_targets=("c_attn",),
        refuse=(Refusal("add_cross_attention", "cross-attention layers (add_cross_attention)"),),
    ),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# The projections of a decoder layer that take LoRA (PEFT's target_modules), by their last
# name: the separate ones (Llama, Qwen, Gemma, Mistral, OLMo2, Granite), Phi-3's fused
# qkv_proj and gate_up_proj, and GPT-2's Conv1D c_attn, c_proj (attention and MLP) and c_fc.
LORA_TARGETS = (
    *("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    *("qkv_proj", "gate_up_proj"),
    *("c_attn", "c_proj", "c_fc"),
)
# rope types whose frequencies depend on the sequence length (HF recomputes them per call, and
# for longrope re-prefills mid-generation): a batch of ragged requests cannot reproduce that
_SEQ_DEPENDENT_ROPE = ("dynamic", "longrope")
# non-persistent rotary buffers some old checkpoints still carry: recomputed from the config
IGNORED_KEY = re.compile(r"(.*\.)?rotary_emb\.inv_freq")
# the three families served before the generic path keep their fingerprint (existing zoos)
_LEGACY = ("llama", "mistral", "qwen2")
_LEGACY_KEYS = (
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
# config keys that never change what a block computes (other families hash every other key)
_INERT_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "initializer_range",
        "attention_dropout",
        "attn_pdrop",
        "embd_pdrop",
        "resid_pdrop",
        "summary_type",
        "summary_use_proj",
        "summary_activation",
        "summary_proj_to_labels",
        "summary_first_dropout",
        "task_specific_params",
        "id2label",
        "label2id",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "tokenizer_class",
        "cache_implementation",
        "model_type",
        "tie_word_embeddings",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "reorder_and_upcast_attn",  # HF's sdpa path ignores it too (eager-only precision knob)
    }
)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One expected tensor: its HF key, its name inside the block, its shape."""

    hf_key: str
    rel: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Layout:
    """Expected tensors per chain position of one checkpoint config, and the HF structure
    they come from (module names of the `*ForCausalLM` class)."""

    model_type: str
    num_layers: int
    tie_word_embeddings: bool
    positions: tuple[tuple[TensorSpec, ...], ...]
    prefix: str = "model"  # the base model's attribute (HF's base_model_prefix)
    layers: str = "layers"  # the decoder layers' ModuleList inside the base model
    token_embed: str = "embed_tokens"  # inside the base model
    position_embed: str | None = None  # learned absolute positions (in the embed block)
    norm: str = "norm"  # the final norm inside the base model (in the head block)
    lm_head: str = "lm_head"  # the output embedding, on the causal LM itself
    ignore: tuple[str, ...] = ()  # regexes of checkpoint keys HF itself ignores on load

    def specs(self) -> dict[str, tuple[int, TensorSpec]]:
        """HF key -> (chain position, spec)."""
        return {s.hf_key: (p, s) for p, specs in enumerate(self.positions) for s in specs}

    @property
    def tied_rel(self) -> str:
        """The embed block's tensor a tied lm_head uses ("embed_tokens.weight")."""
        return f"{self.token_embed}.weight"

    def hf_key(self, position: int, rel: str) -> str:
        """The HF name of tensor `rel` of the block at chain `position`."""
        if 1 <= position <= self.num_layers:
            return f"{self.prefix}.{self.layers}.{position - 1}.{rel}"
        if position > self.num_layers and rel.startswith(f"{self.lm_head}."):
            return rel
        return f"{self.prefix}.{rel}"

    def ignored(self, key: str) -> bool:
        """A checkpoint key HF drops on load (old non-persistent buffers)."""
        return bool(IGNORED_KEY.fullmatch(key)) or any(re.search(p, key) for p in self.ignore)


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
    """The model_type if this config is a supported causal LM; else UnsupportedModelError.

    Torch-free (config keys only); `layout` checks the features that need the HF classes."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        hint = " (text-only Gemma 3 checkpoints are gemma3_text)" if model_type == "gemma3" else ""
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported: no declared difference set for it"
            f"{hint} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    archs = config.get("architectures") or []
    causal = ("ForCausalLM", "LMHeadModel")
    if archs and not any(str(a).endswith(causal) for a in archs):
        raise UnsupportedModelError(
            f"architectures {archs} is not supported: only causal LM checkpoints (*ForCausalLM)"
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


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """Rope settings normalised across the v4 (rope_theta/rope_scaling) and v5 layouts."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    return rope


def fingerprint(config: dict[str, Any]) -> str:
    """Family id: sha256 of what decides a block's computation. Two configs with equal
    fingerprints run the same code on the same block, so stages and equivalences may be shared.

    llama/mistral/qwen2: model_type, the shape-defining keys and the rope parameters (as
    before the generic path). Other families: every config key except the inert ones (ids,
    dropout, provenance), so a difference nobody declared can split a family, never merge two.
    """
    model_type = check_supported(config)
    if model_type in _LEGACY:
        fields: dict[str, Any] = {"model_type": model_type, **dims(config)}
        for key in _LEGACY_KEYS:
            fields.setdefault(key, config.get(key))
        fields["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    else:
        fields = {k: v for k, v in config.items() if k not in _INERT_KEYS}
        fields["model_type"] = model_type
        fields["tie_word_embeddings"] = config.get("tie_word_embeddings")
    fields["rope"] = _rope(config)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# the HF side: config objects, meta skeletons, the derived key map


def hf_config(config: dict[str, Any], attn_implementation: str = "eager") -> Any:
    """The transformers config object of a config.json (supported families only)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = check_supported(config)
    cfg = CONFIG_MAPPING[model_type].from_dict(dict(config))
    cfg._attn_implementation = attn_implementation
    return cfg


def config_aliases(config: dict[str, Any]) -> dict[str, Any]:
    """Llama-style names (hidden_size, num_hidden_layers, ...) a config.json lacks but its HF
    config class maps to its own names (GPT-2's n_embd, n_layer, ...): the importer stores them
    in the manifest so every reader of `manifest.config` finds the usual keys."""
    cfg = hf_config(config)
    return {k: getattr(cfg, k) for k in getattr(type(cfg), "attribute_map", {}) if k not in config}


def check_features(cfg: Any, model_type: str) -> None:
    """UnsupportedModelError naming the first config feature the generic path cannot serve."""
    for r in FAMILIES[model_type].refuse:
        if getattr(cfg, r.key, None):
            raise UnsupportedModelError(f"{model_type}: {r.feature} is not supported ({r.key})")
    rope = getattr(cfg, "rope_parameters", None) or {}
    per_type = rope.values() if all(isinstance(v, dict) for v in rope.values()) else [rope]
    for params in per_type:
        rope_type = str((params or {}).get("rope_type", "default"))
        if rope_type.startswith(_SEQ_DEPENDENT_ROPE):
            raise UnsupportedModelError(
                f"{model_type}: rope_type {rope_type!r} is not supported (its frequencies depend"
                " on the sequence length, which a batch of ragged requests does not share)"
            )


def build_skeleton(cfg: Any) -> Any:
    """The family's `*ForCausalLM` on the meta device, non-persistent buffers (rotary
    frequencies, Gemma's embedding scale) made real on the CPU by the class's own
    `_init_weights`, as HF's from_pretrained does. Parameters stay meta (no memory)."""
    import torch
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
    with torch.device("meta"):
        model = cls(cfg)
    owners = []
    for module in model.modules():
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        for name in meta:
            module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
        if meta:
            owners.append(module)
    with torch.no_grad():
        for module in owners:
            model._init_weights(module)  # parameters are meta: only the buffers get values
    return model.eval()


def _unsupported(model_type: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{model_type}: {what}; the generic decoder path cannot serve it")


def _structure(model: Any, model_type: str, n_layers: int) -> dict[str, Any]:
    """Module names of the skeleton: base prefix, embeddings, layers, final norm, lm_head."""
    from torch import nn

    prefix = model.base_model_prefix
    inner = getattr(model, prefix, None)
    tok, head = model.get_input_embeddings(), model.get_output_embeddings()
    if inner is None or tok is None or head is None:
        raise _unsupported(model_type, f"{type(model).__name__} has no base model or lm_head")
    for name, child in model.named_children():
        if child is not inner and child is not head and any(True for _ in child.parameters()):
            raise _unsupported(model_type, f"module {name!r} outside the base model")
    found: dict[str, Any] = {"prefix": prefix, "position_embed": None, "norm": []}
    found["lm_head"] = next(n for n, c in model.named_children() if c is head)
    for name, child in inner.named_children():
        if child is tok:
            found["token_embed"] = name
        elif isinstance(child, nn.ModuleList) and len(child) == n_layers:
            found["layers"] = name
        elif not any(True for _ in child.parameters()):
            continue  # rotary embedding, dropout: computed from the config, not stored
        elif isinstance(child, nn.Embedding) and found["position_embed"] is None:
            found["position_embed"] = name
        else:
            found["norm"].append(name)
    if "token_embed" not in found or "layers" not in found or len(found["norm"]) != 1:
        raise _unsupported(
            model_type, f"unexpected modules {found['norm']} in {type(inner).__name__}"
        )
    found["norm"] = found["norm"][0]
    learned = FAMILIES[model_type].learned_positions
    if (found["position_embed"] is not None) != learned:
        raise _unsupported(model_type, "learned position embeddings not declared (or missing)")
    return found


@functools.lru_cache(maxsize=16)
def _layout(config_json: str) -> Layout:
    config = json.loads(config_json)
    model_type = check_supported(config)
    cfg = hf_config(config)
    check_features(cfg, model_type)
    n = int(cfg.num_hidden_layers)
    model = build_skeleton(cfg)
    s = _structure(model, model_type, n)
    tok_w = getattr(model, s["prefix"]).get_submodule(s["token_embed"]).weight
    tie = model.get_submodule(s["lm_head"]).weight is tok_w
    positions: list[list[TensorSpec]] = [[] for _ in range(n + 2)]
    base, layers = f"{s['prefix']}.", f"{s['prefix']}.{s['layers']}."
    embeds = tuple(f"{base}{m}." for m in (s["token_embed"], s["position_embed"]) if m)
    for key, t in model.state_dict().items():
        shape = tuple(t.shape)
        if key.startswith(layers):
            index, rel = key[len(layers) :].split(".", 1)
            positions[int(index) + 1].append(TensorSpec(key, rel, shape))
        elif key.startswith(embeds):
            positions[0].append(TensorSpec(key, key[len(base) :], shape))
        elif key.startswith(f"{base}{s['norm']}."):
            positions[n + 1].append(TensorSpec(key, key[len(base) :], shape))
        elif key.startswith(f"{s['lm_head']}."):
            if not (tie and key == f"{s['lm_head']}.weight"):
                positions[n + 1].append(TensorSpec(key, key, shape))
        else:
            raise _unsupported(model_type, f"tensor {key} belongs to no block")
    ignore = tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    return Layout(
        model_type=model_type,
        num_layers=n,
        tie_word_embeddings=tie,
        positions=tuple(tuple(p) for p in positions),
        ignore=ignore,
        **s,
    )


def layout(config: dict[str, Any]) -> Layout:
    """The full expected key map of a checkpoint with this config.json (derived from its HF
    class; cached per config). Raises UnsupportedModelError, CheckpointError."""
    try:
        return _layout(json.dumps(config, sort_keys=True, default=str))
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise CheckpointError(f"config.json does not build its model class: {e}") from e


def postprocess_logits(traits: Traits, cfg: Any, logits: Any) -> Any:
    """What the family's causal LM does to lm_head's output (Granite divides, Gemma caps)."""
    if traits.logits_divisor is not None:
        logits = logits / getattr(cfg, traits.logits_divisor)
    cap = getattr(cfg, traits.logits_softcap, None) if traits.logits_softcap else None
    if cap is not None:
        logits = logits / cap
        logits = logits.tanh()
        logits = logits * cap
    return logits
