"""LoRA tenants for `bench multitenant --family lora`: a base, K PEFT adapters of it and F full
fine-tunes of it (the issue's mix: an operator hosts both kinds).

Adapter i (made with peft, `blockllm.zoo.lora.train_lora`, `steps=0`: PEFT's random init, so
every adapter changes the output; seconds each, cached) has rank 8 + i mod 9 (8-16), one of
four target sets, and covers a slice of the base's upper layers (the slices of the partial
family). The full fine-tunes are the `full` family's (every tensor, a few AdamW steps, cached).
One zoo holds the base, every adapter imported as an adapter (`zoo import`: a few adapter
blocks on the base's chain) and the full fine-tunes. blockllm serves the adapters on the base
in the same steps; the baselines merge each adapter into a whole copy of the base when they
load it, the way their users would (per_model: `per_model.merge_adapter`; the HF systems:
peft's `merge_and_unload`), so no merged copy is ever written to disk.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

TARGET_SETS = (
    ("q_proj", "v_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("gate_proj", "up_proj", "down_proj"),
    ("q_proj", "v_proj", "up_proj", "down_proj"),
)

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


def prepare_lora(spec: object, root: Path, base_name: str, base_dir: Path, say: Say) -> object:
    """The Family of `spec` (mode "lora"): tenants = the base, its adapters (`checkpoint` = the
    base's, `adapter` = the PEFT folder) and `spec.full_variants` full fine-tunes."""
    from blockllm.client.bench.family import Family, Tenant, _num_layers, _variant, variant_plans
    from blockllm.zoo import Zoo

    plans = variant_plans(base_name, _num_layers(base_dir), spec.variants, "partial")
    zoo = Zoo(root / "zoo")
    if not zoo.has_model(base_name):
        say(f"importing {base_name} into the zoo {zoo.root}")
        zoo.import_checkpoint(base_dir, base_name)
    tenants = [Tenant(base_name, base_dir)]
    for i, plan in enumerate(plans):
        name = f"{base_name}-lora{i + 1}"
        adapter = make_adapter(base_dir, root / "adapters" / name, plan.layers, i, say)
        if not zoo.has_model(name):
            zoo.import_adapter(adapter, name, base=base_name)
        tenants.append(Tenant(name, base_dir, plan.layers, adapter))
    for plan in variant_plans(base_name, 0, spec.full_variants, "full"):
        out = _variant(base_dir, root / "ckpt" / plan.name, plan, spec.recipe, say)
        if not zoo.has_model(plan.name):
            say(f"importing {plan.name} into the zoo {zoo.root}")
            zoo.import_checkpoint(out, plan.name)
        tenants.append(Tenant(plan.name, out))
    return Family(spec.kind, "lora", tuple(tenants), Path(zoo.root))
