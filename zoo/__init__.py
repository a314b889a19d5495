"""BlockLLM zoo: content-addressed model blocks on disk (import, verify, export, gc, equivalence).

See docs/internals.md for the contract the worker codes against. The names below load on first
use (PEP 562), so `blockllm.zoo.chain` (chain facts, which the broker reads) does not pull in
the store and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "blockllm.zoo.errors",
    "IntegrityError": "blockllm.zoo.errors",
    "UnknownModelError": "blockllm.zoo.errors",
    "UnsupportedModelError": "blockllm.zoo.errors",
    "ZooError": "blockllm.zoo.errors",
    "block_id": "blockllm.zoo.hashing",
    "ModelManifest": "blockllm.zoo.manifest",
    "ModelExistsError": "blockllm.zoo.store",
    "Zoo": "blockllm.zoo.store",
}

__all__ = [*sorted(_EXPORTS), "config_fingerprint"]


def __getattr__(name: str) -> Any:
    if name == "config_fingerprint":
        from blockllm.zoo.families import fingerprint

        return fingerprint
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'blockllm.zoo' has no attribute {name!r}")
