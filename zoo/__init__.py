"""BlockLLM zoo: content-addressed model blocks on disk (import, verify, export, gc, equivalence).

See docs/internals.md for the contract the worker codes against.
"""

from blockllm.zoo.errors import (
    CheckpointError,
    IntegrityError,
    UnknownModelError,
    UnsupportedModelError,
    ZooError,
)
from blockllm.zoo.families import fingerprint as config_fingerprint
from blockllm.zoo.hashing import block_id
from blockllm.zoo.manifest import ModelManifest
from blockllm.zoo.store import ModelExistsError, Zoo

__all__ = [
    "CheckpointError",
    "IntegrityError",
    "ModelExistsError",
    "ModelManifest",
    "UnknownModelError",
    "UnsupportedModelError",
    "Zoo",
    "ZooError",
    "block_id",
    "config_fingerprint",
]
