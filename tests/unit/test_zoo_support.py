"""Helpers shared by the zoo tests (no tests here): fine-tunes and checkpoint surgery."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def finetune(base: Path, out: Path, noise: dict[int, float], seed: int = 1) -> Path:
    """A "fine-tune" of `base`: layer i gets Gaussian noise of scale noise[i], the rest is
    untouched (bit-identical), saved with save_pretrained plus the base's tokenizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, scale in sorted(noise.items()):
            for p in decoder_layers(model)[i].parameters():
                delta = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                p.add_((delta * scale).to(p.dtype))
    model.save_pretrained(out)
    copy_tokenizer(base, out)
    return out


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of any supported family's HF model (model.layers, transformer.h)."""
    from blockllm.zoo.families import layout

    lay = layout(model.config.to_dict())
    return model.get_submodule(f"{lay.prefix}.{lay.layers}")


def copy_tokenizer(src: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in `folder`."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return out


def rewrite_checkpoint(src: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Copy the non-weight files of `src` to `out` and write `tensors` as model.safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and "index" not in f.name:
            shutil.copyfile(f, out / f.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out
