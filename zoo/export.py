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


def hf_key(m: ModelManifest, position: int, rel: str) -> str:
    """The HF name of tensor `rel` of the block at chain `position` of model `m`."""
    return layout(m.config).hf_key(position, rel)


def hf_config_doc(m: ModelManifest) -> dict:
    """The checkpoint's config.json as imported (without the names the importer added)."""
    added = set(m.source.get("config_aliases") or ())
    return {k: v for k, v in m.config.items() if k not in added}


def hf_state_dict(zoo: Zoo, m: ModelManifest, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """The model's tensors under HF names (a tied lm_head is left out, as HF saves it)."""
    lay = layout(m.config)
    sd: dict[str, torch.Tensor] = {}
    for p, bid in enumerate(m.chain):
        for rel, t in zoo.load_block(bid, verify=verify).items():
            sd[lay.hf_key(p, rel)] = t
    expected = {s.hf_key: s.shape for specs in lay.positions for s in specs}
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
    if m.adapter is not None:
        from blockllm.zoo.adapters import export_adapter

        return export_adapter(zoo, m, out)
    out.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(zoo, m)
    logger.info("[export] %s: %d tensors -> %s", name, len(sd), out)
    atomic_write(out / "model.safetensors", lambda tmp: save_file(sd, str(tmp), {"format": "pt"}))
    config = json.dumps(hf_config_doc(m), indent=2) + "\n"
    atomic_write_bytes(out / "config.json", config.encode())
    if m.generation:
        data = json.dumps(m.generation, indent=2) + "\n"
        atomic_write_bytes(out / "generation_config.json", data.encode())
    zoo.copy_tokenizer(name, out)
    return out
