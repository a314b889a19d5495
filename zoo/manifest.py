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
            )
            layers = m.config["num_hidden_layers"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"{where}: malformed manifest ({e})") from e
        if len(m.chain) != layers + 2:
            raise IntegrityError(f"{where}: chain of {len(m.chain)} blocks for {layers} layers")
        return m
