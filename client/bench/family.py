"""Tenants for the benchmarks and the demo: a base checkpoint, fine-tuned variants of it made
the way users make them (`blockllm.zoo.models.finetune`), and a zoo holding all of them.

Everything is cached under one folder (by default ~/.cache/blockllm/bench/<family>/): the
checkpoints in `ckpt/<name>/` (a variant is reused when its folder holds a finished fine-tune
record), the zoo in `zoo/` (a model already imported is not imported again). SmolLM2 itself is
converted once into ~/.cache/blockllm/smollm2-<dtype> and shared with `bench stage|pipeline`.

Variants (`partial`): each fine-tunes a different slice of the base's upper half of decoder
layers (slices of equal width from the top down, wrapping around when there are more variants
than slices; the seed differs per variant, so two variants on one slice still differ).
Variants (`full`): every tensor is fine-tuned a few steps; nothing dedupes exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blockllm.zoo import Zoo

logger = logging.getLogger(__name__)

Say = Callable[[str], None]

SMOLLM2_DTYPE = "float32"


@dataclass(frozen=True, slots=True)
class Recipe:
    """How variants are fine-tuned (part of their cache key)."""

    steps: int = 6
    seq_len: int = 64
    batch_size: int = 4
    lr: float = 2e-4

    def tag(self) -> str:
        doc = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(doc).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class VariantPlan:
    """One variant to make: its name, the layers fine-tuned (None: every tensor), its seed."""

    name: str
    layers: tuple[int, int] | None
    seed: int


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    checkpoint: Path
    layers: tuple[int, int] | None = None  # fine-tuned span; None for the base or a full fine-tune
    adapter: Path | None = None  # a LoRA tenant's PEFT folder (`checkpoint` is then its base's)


@dataclass(frozen=True, slots=True)
class Family:
    """Prepared tenants (base first) and the zoo that holds them."""

    kind: str  # "smollm2" | "tiny"
    mode: str  # "partial" | "full"
    tenants: tuple[Tenant, ...]
    zoo_dir: Path

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tenants)

    @property
    def base(self) -> Tenant:
        return self.tenants[0]


@dataclass(frozen=True, slots=True)
class FamilySpec:
    """Which family to prepare and where."""

    kind: str = "smollm2"  # or "tiny"
    mode: str = "partial"  # or "full", or "lora" (K PEFT adapters: client/bench/lora_family.py)
    variants: int = 6
    cache_dir: Path | None = None  # default ~/.cache/blockllm/bench
    recipe: Recipe = Recipe()
    tiny_layers: int = 8
    tiny_hidden: int = 128
    dtype: str = SMOLLM2_DTYPE  # of every checkpoint of the family (the base's, kept by variants)
    full_variants: int = 0  # mode "lora": full fine-tunes of the base among the tenants too


def variant_plans(base: str, n_layers: int, k: int, mode: str) -> list[VariantPlan]:
    """The K variants of a base with `n_layers` decoder layers (see the module docstring)."""
    if mode == "full":
        return [VariantPlan(f"{base}-full{i + 1}", None, i + 1) for i in range(k)]
    upper = n_layers - n_layers // 2
    width = max(1, upper // max(1, k))
    slices = max(1, upper // width)
    plans = []
    for i in range(k):
        j = i % slices
        hi = n_layers - 1 - j * width
        lo = hi - width + 1
        plans.append(VariantPlan(f"{base}-ft{i + 1}", (lo, hi), i + 1))
    return plans


def _root(spec: FamilySpec) -> Path:
    cache = spec.cache_dir or Path.home() / ".cache" / "blockllm" / "bench"
    size = "" if spec.kind == "smollm2" else f"-l{spec.tiny_layers}-h{spec.tiny_hidden}"
    dtype = "" if spec.dtype == SMOLLM2_DTYPE else f"-{spec.dtype}"
    return cache / f"{spec.kind}{size}{dtype}-{spec.mode}-{spec.recipe.tag()}"


def _base_checkpoint(spec: FamilySpec, root: Path, say: Say) -> tuple[str, Path]:
    """(base name, folder): SmolLM2 converted (cached), or a tiny random Llama (cached)."""
    if spec.kind == "smollm2":
        from blockllm.zoo.models import convert_smollm2

        out = Path.home() / ".cache" / "blockllm" / f"smollm2-{spec.dtype}"
        return "smollm2", convert_smollm2(out, dtype=spec.dtype, progress=say)
    if spec.kind != "tiny":
        raise ValueError(f"unknown family kind {spec.kind!r} (smollm2 or tiny)")
    out = root / "ckpt" / "tiny"
    if not (out / "config.json").is_file():
        from blockllm.zoo.tiny import build_tiny

        say(f"building a tiny random Llama ({spec.tiny_layers} layers, hidden {spec.tiny_hidden})")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
        try:
            import torch

            dtype = getattr(torch, spec.dtype)
            build_tiny("llama", tmp, layers=spec.tiny_layers, hidden=spec.tiny_hidden, dtype=dtype)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)  # whole or absent: config.json marks a finished build
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return "tiny", out


def _variant(base_dir: Path, out: Path, plan: VariantPlan, recipe: Recipe, say: Say) -> Path:
    from blockllm.zoo.finetune import FINETUNE_RECORD, finetune

    if (out / FINETUNE_RECORD).is_file():
        return out
    what = "every tensor" if plan.layers is None else f"layers {plan.layers[0]}-{plan.layers[1]}"
    say(f"fine-tuning {plan.name}: {what}, {recipe.steps} AdamW steps (cached afterwards)")
    return finetune(
        base_dir,
        out,
        plan.layers,
        full=plan.layers is None,
        steps=recipe.steps,
        seq_len=recipe.seq_len,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=plan.seed,
        overwrite=True,  # a folder without the record is a leftover
    )


def _num_layers(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"])


def prepare_family(spec: FamilySpec, say: Say) -> Family:
    """Make (or reuse) the base, its variants and the zoo; returns the Family. Raises
    ModelBuildError (blockllm.zoo.models) when SmolLM2 cannot be converted, ZooError."""
    from blockllm.zoo import Zoo

    root = _root(spec)
    base_name, base_dir = _base_checkpoint(spec, root, say)
    if spec.mode == "lora":
        from blockllm.client.bench.lora_family import prepare_lora

        return prepare_lora(spec, root, base_name, base_dir, say)  # type: ignore[return-value]
    plans = variant_plans(base_name, _num_layers(base_dir), spec.variants, spec.mode)
    tenants = [Tenant(base_name, base_dir)]
    for plan in plans:
        out = _variant(base_dir, root / "ckpt" / plan.name, plan, spec.recipe, say)
        tenants.append(Tenant(plan.name, out, plan.layers))
    zoo = Zoo(root / "zoo")
    for t in tenants:
        if not zoo.has_model(t.name):
            say(f"importing {t.name} into the zoo {zoo.root}")
            zoo.import_checkpoint(t.checkpoint, t.name)
    return Family(spec.kind, spec.mode, tuple(tenants), Path(zoo.root))


# -- memory facts ------------------------------------------------------------------------------


def model_bytes(zoo: Zoo, name: str) -> int:
    """Bytes of one model held whole: its distinct blocks (a tied head adds nothing)."""
    m = zoo.manifest(name)
    return sum(zoo.block_nbytes(b) for b in set(m.chain))


def shared_bytes(zoo: Zoo, names: Sequence[str]) -> int:
    """Bytes of the distinct blocks of all `names` together, adapter blocks included (what the
    shared zoo needs)."""
    blocks: set[str] = set()
    for name in names:
        m = zoo.manifest(name)
        blocks.update(m.chain)
        blocks.update(b for _, b in m.adapter_blocks)
    return sum(zoo.block_nbytes(b) for b in blocks)


def adapter_bytes(zoo: Zoo, names: Sequence[str]) -> int:
    """Bytes of the distinct LoRA adapter blocks of `names` (as stored)."""
    blocks = {b for name in names for _, b in zoo.manifest(name).adapter_blocks}
    return sum(zoo.block_nbytes(b) for b in blocks)


def kv_bytes_per_token(zoo: Zoo, name: str) -> int:
    """KV-cache bytes one token of `name` takes over all its decoder layers (K and V)."""
    m = zoo.manifest(name)
    cfg = m.config
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    itemsize = 2 if m.dtype in ("bfloat16", "float16") else 4
    return 2 * kv_heads * head_dim * itemsize * int(cfg["num_hidden_layers"])
