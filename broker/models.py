"""The broker's view of the zoo's models: what validation, routing and detokenizing need.

`ZooCatalog(root)()` reads every manifest (and loads each distinct tokenizer once) into
`ModelSpec`s; the Broker calls it at start and on `reload()`. Tests build `ModelSpec`s
directly, so the Broker itself never touches the disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockllm.zoo.chain import decoder_layers_in

logger = logging.getLogger(__name__)

Catalog = Callable[[], Mapping[str, "ModelSpec"]]
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
NO_POSITION_LIMIT = 1 << 31


@dataclass(frozen=True, slots=True, eq=False)
class ModelSpec:
    """One servable model: chain length, limits, EOS ids, tokenizer, and its manifest."""

    name: str
    chain_len: int
    vocab_size: int
    max_positions: int = NO_POSITION_LIMIT
    eos_ids: frozenset[int] = frozenset()
    # KV bytes one token occupies in one decoder layer (an estimate for credit accounting)
    kv_bytes_per_token_layer: int = 0
    tokenizer: Any = None
    manifest: Any = None
    kv_heads_dim: str = ""  # "<kv heads>x<head dim>": how a worker's KV arena labels it

    @property
    def num_layers(self) -> int:
        return self.chain_len - 2

    @property
    def hidden_size(self) -> int:
        """The width of a hidden state between two stages (0: unknown, not checked)."""
        config = getattr(self.manifest, "config", None) or {}
        value = config.get("hidden_size", 0)
        return value if isinstance(value, int) and value > 0 else 0

    def decoder_layers_in(self, start: int, end: int) -> int:
        """How many decoder layers (positions 1..L) the span [start, end) holds."""
        return decoder_layers_in(self.chain_len, start, end)


def eos_ids_of(manifest: Any, fallback: int | None) -> frozenset[int]:
    """EOS ids: generation_config's eos_token_id (int or list), else config's, else fallback."""
    for source in (manifest.generation or {}, manifest.config or {}):
        value = source.get("eos_token_id")
        if isinstance(value, int) and not isinstance(value, bool):
            return frozenset({value})
        if isinstance(value, list) and value:
            return frozenset(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    return frozenset() if fallback is None else frozenset({fallback})


def kv_reservation(spec: ModelSpec, geometries: Any, dtype: str, layers: int, tokens: int) -> int:
    """KV bytes a worker's arena takes for `layers` decoder layers x `tokens` tokens of the
    model served in `dtype` (its stage's): whole pages of that geometry when the worker
    reports it (HEARTBEAT `kv_geometries`), else the manifest's per-token estimate in `dtype`
    (the stored dtype when unknown)."""
    if layers <= 0:
        return 0
    label = f"{spec.kv_heads_dim}/{dtype}"
    for g in geometries or ():
        if g.label == label and g.page_size > 0 and g.page_bytes > 0:
            return layers * -(-tokens // g.page_size) * g.page_bytes
    per = spec.kv_bytes_per_token_layer
    stored = _ITEMSIZE.get(getattr(spec.manifest, "dtype", ""), 4)
    if dtype in _ITEMSIZE and per:
        per = per // stored * _ITEMSIZE[dtype]
    return layers * tokens * per


def kv_heads_dim(config: Mapping[str, Any]) -> str:
    """`<kv heads>x<head dim>` of a config ("" when it does not say)."""
    try:
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return ""
    return f"{kv_heads}x{head_dim}"


def kv_bytes_per_token_layer(config: Mapping[str, Any], dtype: str) -> int:
    """K and V of one token in one layer: 2 * kv_heads * head_dim * itemsize."""
    try:
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0
    return 2 * kv_heads * head_dim * _ITEMSIZE.get(dtype, 4)


def spec_from_manifest(manifest: Any, tokenizer: Any, eos_fallback: int | None) -> ModelSpec:
    """A ModelSpec of a `blockllm.zoo.ModelManifest`."""
    config = manifest.config or {}
    max_pos = config.get("max_position_embeddings")
    return ModelSpec(
        name=manifest.name,
        chain_len=len(manifest.chain),
        vocab_size=int(config.get("vocab_size") or 0),
        max_positions=max_pos if isinstance(max_pos, int) and max_pos > 0 else NO_POSITION_LIMIT,
        eos_ids=eos_ids_of(manifest, eos_fallback),
        kv_bytes_per_token_layer=kv_bytes_per_token_layer(config, manifest.dtype),
        tokenizer=tokenizer,
        manifest=manifest,
        kv_heads_dim=kv_heads_dim(config),
    )


class ZooCatalog:
    """Callable that reads the zoo's models; tokenizers are loaded once per folder and kept.

    Called from the broker's loop thread only. A manifest or tokenizer that fails to load is
    logged and skipped: one bad model must not stop the others from being served.
    """

    def __init__(self, root: str | Path, eos_fallback: int | None = None) -> None:
        from blockllm.zoo import Zoo

        self._zoo = Zoo(root)
        self._eos_fallback = eos_fallback
        self._tokenizers: dict[Path, Any] = {}

    def __call__(self) -> dict[str, ModelSpec]:
        from blockllm.zoo import ZooError

        specs: dict[str, ModelSpec] = {}
        for name in self._zoo.list_models():
            try:
                manifest = self._zoo.manifest(name)
                tokenizer = self._tokenizer(self._zoo.tokenizer_dir(name))
            except ZooError as e:
                logger.warning("[models] skipping %s: %s", name, e)
                continue
            except Exception:  # e.g. a tokenizer transformers cannot load: skip just this one
                logger.exception("[models] skipping %s", name)
                continue
            specs[name] = spec_from_manifest(manifest, tokenizer, self._eos_fallback)
        return specs

    def _tokenizer(self, folder: Path | None) -> Any:
        if folder is None:
            return None
        if folder not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[folder] = AutoTokenizer.from_pretrained(str(folder))
        return self._tokenizers[folder]
