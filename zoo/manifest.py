"""ModelManifest: one model's chain, config, tokenizer and provenance (`models/<name>.json`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from blockllm.zoo.errors import IntegrityError, ZooError

MANIFEST_FORMAT = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_name(name: str) -> str:
    """A model name: letters, digits and `-_.`, starting with a letter or digit, <= 128 chars."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ZooError(
            f"invalid model name {name!r}: use letters, digits and '-', '_', '.', "
            "starting with a letter or digit (at most 128 characters)"
        )
    return name


@dataclass(frozen=True, slots=True)
class ModelManifest:
    """A model as the zoo stores it: config + ordered block ids + tokenizer + generation.

    `chain[p]` is chain position p: 0 = embed, 1..L = decoder layers, L+1 = head.
    """

    name: str
    model_type: str
    config: dict[str, Any]
    chain: tuple[str, ...]
    tie_word_embeddings: bool
    dtype: str
    generation: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    # a LoRA adapter (zoo/adapters.py): its chain is its base's, plus these facts
    # {"base", "blocks": [adapter block id | None per chain position], "config", ...}
    adapter: dict[str, Any] | None = None

    @property
    def is_adapter(self) -> bool:
        return self.adapter is not None

    @property
    def adapter_blocks(self) -> tuple[tuple[int, str], ...]:
        """(chain position, adapter block id) of every position the adapter changes."""
        if self.adapter is None:
            return ()
        return tuple((p, b) for p, b in enumerate(self.adapter["blocks"]) if b)

    def all_blocks(self) -> tuple[str, ...]:
        """Every block id the model references: its chain, then its adapter blocks."""
        return (*self.chain, *(b for _, b in self.adapter_blocks))

    @property
    def num_layers(self) -> int:
        return len(self.chain) - 2

    @property
    def block_bytes(self) -> tuple[int, ...]:
        """Stored size of each chain position's block (from provenance)."""
        return tuple(self.source.get("block_bytes", ()))

    def to_json(self) -> str:
        doc = {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "model_type": self.model_type,
            "fingerprint": self.fingerprint,
            "dtype": self.dtype,
            "tie_word_embeddings": self.tie_word_embeddings,
            "chain": list(self.chain),
            "tokenizer": self.tokenizer,
            "generation": self.generation,
            "config": self.config,
            "source": self.source,
        }
        if self.adapter is not None:
            doc["adapter"] = self.adapter
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str = "manifest") -> ModelManifest:
        """Parse a manifest; IntegrityError if it is not one this version understands."""
        try:
            doc = json.loads(text)
            if doc.get("format") != MANIFEST_FORMAT:
                raise IntegrityError(f"{where}: unsupported manifest format {doc.get('format')!r}")
            m = cls(
                name=doc["name"],
                model_type=doc["model_type"],
                config=doc["config"],
                chain=tuple(doc["chain"]),
                tie_word_embeddings=bool(doc["tie_word_embeddings"]),
                dtype=doc["dtype"],
                generation=doc.get("generation") or {},
                tokenizer=doc.get("tokenizer"),
                source=doc.get("source") or {},
                fingerprint=doc.get("fingerprint", ""),
                adapter=doc.get("adapter"),
            )
            layers = m.config["num_hidden_layers"]
            if m.adapter is not None and len(m.adapter["blocks"]) != len(m.chain):
                raise IntegrityError(f"{where}: adapter blocks do not match the chain")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"{where}: malformed manifest ({e})") from e
        if len(m.chain) != layers + 2:
            raise IntegrityError(f"{where}: chain of {len(m.chain)} blocks for {layers} layers")
        return m
