"""Canonical content hashes: a block id is independent of tensor order and file metadata.

The canonical stream of a block, for each tensor name in sorted order:
`name`, `dtype`, `shape`, raw bytes, every field length-prefixed so that no two different
blocks can produce the same stream. The id is the hex sha256 of that stream.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

_CHUNK = 1 << 24  # hash big tensors in 16 MiB pieces: bounded temporaries


def _field(h: hashlib._Hash, data: bytes) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def dtype_name(dtype: torch.dtype) -> str:
    """ "float32", "bfloat16", ... (torch's name without the `torch.` prefix)."""
    return str(dtype).removeprefix("torch.")


def update_tensor(h: hashlib._Hash, name: str, t: torch.Tensor) -> None:
    """Feed one named tensor into `h` in canonical form."""
    _field(h, name.encode())
    _field(h, dtype_name(t.dtype).encode())
    _field(h, ",".join(str(d) for d in t.shape).encode())
    # uint8 reinterpretation is bf16-safe; reshape(-1) also covers 0-d tensors
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    h.update(struct.pack("<Q", raw.numel()))
    for start in range(0, raw.numel(), _CHUNK):
        h.update(raw[start : start + _CHUNK].numpy().data)


def block_id(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of a block's canonical content (names relative to the block)."""
    h = hashlib.sha256(b"blockllm-block-v1\0")
    for name in sorted(tensors):
        update_tensor(h, name, tensors[name])
    return h.hexdigest()


def file_block_id(path: str | Path) -> str:
    """Block id of a stored .safetensors file, reading one tensor at a time."""
    from safetensors import safe_open

    h = hashlib.sha256(b"blockllm-block-v1\0")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name in sorted(f.keys()):
            update_tensor(h, name, f.get_tensor(name))
    return h.hexdigest()


def files_digest(files: Iterable[tuple[str, bytes]]) -> str:
    """Hex sha256 over (name, content) pairs in name order: the id of a tokenizer folder."""
    h = hashlib.sha256(b"blockllm-files-v1\0")
    for name, data in sorted(files):
        _field(h, name.encode())
        _field(h, data)
    return h.hexdigest()
