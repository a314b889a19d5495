"""LoRA tenants for `bench multitenant --family lora`: a base and K PEFT adapters of it.

Adapter i (made with peft, `blockllm.zoo.lora.train_lora`, `steps=0`: PEFT's random init, so
every adapter changes the output) has rank 8 + i mod 9 (8-16), one of four target sets, and
covers a slice of the base's upper layers (the slices of the partial family). Two zoos:

- `zoo/`: the base and every adapter imported as an adapter (`zoo import`): what blockllm
  serves (one base, adapter blocks applied per request in the same steps);
- `merged-zoo/`: the base and every adapter merged into a whole model of its own
  (`PeftModel.merge_and_unload`, saved as a checkpoint under `merged/<name>/`): what the
  baselines serve (per_model loads whole models; the HF systems load the merged checkpoints,
  the fastest way HF + PEFT serves one adapter at a time).

Everything is cached under the family's folder; a merged checkpoint is reused when it holds
its `merged.json` record.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

TARGET_SETS = (
    ("q_proj", "v_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("gate_proj", "up_proj", "down_proj"),
    ("q_proj", "v_proj", "up_proj", "down_proj"),
)
MERGED_RECORD = "merged.json"

Say = Callable[[str], None]


def adapter_settings(i: int) -> tuple[int, tuple[str, ...]]:
    """(rank, targets) of the family's adapter i (0-based)."""
    return 8 + i % 9, TARGET_SETS[i % len(TARGET_SETS)]


def make_adapter(
    base_dir: Path, out: Path, layers: tuple[int, int] | None, i: int, say: Say
) -> Path:
    """Adapter i of the family in `out` (made once)."""
    from blockllm.zoo.lora import train_lora

    if (out / "adapter_config.json").is_file():
        return out
    rank, targets = adapter_settings(i)
    say(f"making adapter {out.name} with peft: rank {rank}, {'/'.join(targets)}, layers {layers}")
    return train_lora(
        base_dir, out, layers, rank=rank, targets=targets, steps=0, seed=i + 1, overwrite=True
    )


def merge_adapter(base_dir: Path, adapter: Path, out: Path, dtype: str, say: Say) -> Path:
    """The base with `adapter` merged in, saved as a whole checkpoint `out` (made once)."""
    if (out / MERGED_RECORD).is_file():
        return out
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    say(f"merging {adapter.name} into a whole checkpoint (the baselines' copy)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merge-", dir=out.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype))
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
        for f in base_dir.iterdir():  # the tokenizer files travel with the weights
            tokenizer = f.name.startswith(("tokenizer", "special_tokens")) or f.suffix == ".model"
            if f.is_file() and tokenizer:
                shutil.copy2(f, tmp / f.name)
        record = {"base": str(base_dir), "adapter": str(adapter)}
        (tmp / MERGED_RECORD).write_text(json.dumps(record))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def prepare_lora(spec: object, root: Path, base_name: str, base_dir: Path, say: Say) -> object:
    """The Family of `spec` (mode "lora"): tenants = the base and its adapters, whose
    `checkpoint` is the merged one (what the HF systems load); `zoo_dir` holds the adapters,
    `merged_zoo_dir` the merged models."""
    from blockllm.client.bench.family import Family, Tenant, _num_layers, variant_plans
    from blockllm.zoo import Zoo

    plans = variant_plans(base_name, _num_layers(base_dir), spec.variants, "partial")
    zoo, merged_zoo = Zoo(root / "zoo"), Zoo(root / "merged-zoo")
    for z in (zoo, merged_zoo):
        if not z.has_model(base_name):
            say(f"importing {base_name} into the zoo {z.root}")
            z.import_checkpoint(base_dir, base_name)
    tenants = [Tenant(base_name, base_dir)]
    for i, plan in enumerate(plans):
        name = f"{base_name}-lora{i + 1}"
        adapter = make_adapter(base_dir, root / "adapters" / name, plan.layers, i, say)
        merged = merge_adapter(base_dir, adapter, root / "merged" / name, spec.dtype, say)
        if not zoo.has_model(name):
            zoo.import_adapter(adapter, name, base=base_name)
        if not merged_zoo.has_model(name):
            say(f"importing {name} merged into the zoo {merged_zoo.root}")
            merged_zoo.import_checkpoint(merged, name)
        tenants.append(Tenant(name, merged, plan.layers))
    return Family(spec.kind, "lora", tuple(tenants), Path(zoo.root), Path(merged_zoo.root))
