"""Model in the zoo -> HF checkpoint folder (config.json, model.safetensors, tokenizer)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from blockllm.zoo.errors import IntegrityError, ZooError
from blockllm.zoo.families import layout
from blockllm.zoo.fsutil import atomic_write, atomic_write_bytes
from blockllm.zoo.manifest import ModelManifest
from blockllm.zoo.store import Zoo

logger = logging.getLogger(__name__)


def hf_key(position: int, num_layers: int, rel: str) -> str:
    """The HF name of tensor `rel` of the block at chain `position`."""
    if position == 0:
        return f"model.{rel}"
    if position <= num_layers:
        return f"model.layers.{position - 1}.{rel}"
    return rel if rel == "lm_head.weight" else f"model.{rel}"


def hf_state_dict(zoo: Zoo, m: ModelManifest, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """The model's tensors under HF names (a tied lm_head is left out, as HF saves it)."""
    sd: dict[str, torch.Tensor] = {}
    for p, bid in enumerate(m.chain):
        for rel, t in zoo.load_block(bid, verify=verify).items():
            sd[hf_key(p, m.num_layers, rel)] = t
    expected = {s.hf_key: s.shape for specs in layout(m.config).positions for s in specs}
    if set(sd) != set(expected):
        odd = sorted(set(sd) ^ set(expected))
        raise IntegrityError(f"model {m.name!r}: blocks do not match its config ({odd[:5]})")
    for key, t in sd.items():
        if tuple(t.shape) != expected[key]:
            raise IntegrityError(f"model {m.name!r}: {key} has shape {list(t.shape)}")
    return sd


def export_model(zoo: Zoo, name: str, out: Path) -> Path:
    """Write model `name` to the new or empty folder `out`; returns `out`."""
    from safetensors.torch import save_file

    m = zoo.manifest(name)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ZooError(f"output folder {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(zoo, m)
    logger.info("[export] %s: %d tensors -> %s", name, len(sd), out)
    atomic_write(out / "model.safetensors", lambda tmp: save_file(sd, str(tmp), {"format": "pt"}))
    atomic_write_bytes(out / "config.json", (json.dumps(m.config, indent=2) + "\n").encode())
    if m.generation:
        data = json.dumps(m.generation, indent=2) + "\n"
        atomic_write_bytes(out / "generation_config.json", data.encode())
    zoo.copy_tokenizer(name, out)
    return out
