"""PEFT LoRA adapter folder <-> adapter blocks on top of a zoo model's chain.

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors` with tensors
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]. The zoo keeps
one content-addressed **adapter block** per decoder layer the adapter touches, with, per target
module (relative to the layer, e.g. `self_attn.q_proj`), `<module>.lora_A`, `<module>.lora_B`
and `<module>.scaling` (a float32 scalar: alpha / r, or alpha / sqrt(r) with rsLoRA, PEFT's
`rank_pattern` / `alpha_pattern` honoured). The adapter's manifest is its base model's (chain,
config, tokenizer, generation) plus `adapter`: the base's name, the adapter block of each chain
position (None where the adapter changes nothing), the config as imported (for export).
Dropout is ignored (inference). DoRA and the other LoRA variants are refused with a message.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from blockllm.zoo.errors import CheckpointError, UnknownModelError, UnsupportedModelError
from blockllm.zoo.families import FAMILIES, LORA_TARGETS, Layout, layout
from blockllm.zoo.fsutil import atomic_write, atomic_write_bytes
from blockllm.zoo.manifest import ModelManifest, validate_name
from blockllm.zoo.store import ModelExistsError, Progress, Zoo

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
# config fields of LoRA variants we do not serve: any truthy value is refused by name
_REFUSED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "lora_bias": "LoRA with a trained bias",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "alora_invocation_tokens": "aLoRA (activated LoRA)",
    "megatron_config": "Megatron parallel LoRA",
}
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def is_adapter_folder(path: Path) -> bool:
    """A folder with a PEFT `adapter_config.json` (its weights are checked on import)."""
    return (path / ADAPTER_CONFIG).is_file()


def _read_config(src: Path) -> dict[str, Any]:
    from blockllm.zoo.importer import read_json

    cfg = read_json(src / ADAPTER_CONFIG, ADAPTER_CONFIG)
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise UnsupportedModelError(f"{src}: peft_type {kind!r} is not supported (only LORA)")
    for key, what in _REFUSED.items():
        if cfg.get(key):
            raise UnsupportedModelError(f"{src}: {what} is not supported; only plain LoRA is")
    if cfg.get("bias", "none") != "none":
        raise UnsupportedModelError(f"{src}: bias={cfg['bias']!r} is not supported (need 'none')")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{src}: {ADAPTER_CONFIG} needs a positive {key!r}")
    return cfg


def _pattern(patterns: dict[str, Any] | None, key: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the first pattern that matches the end of the module name."""
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def lora_scaling(cfg: dict[str, Any], module: str) -> tuple[int, float]:
    """(rank, scaling) PEFT gives module `module` (its name in the causal LM)."""
    r = int(_pattern(cfg.get("rank_pattern"), module, cfg["r"]))
    alpha = float(_pattern(cfg.get("alpha_pattern"), module, cfg["lora_alpha"]))
    return r, (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)


def _checkpoint_chain(folder: Path) -> tuple[str, ...] | None:
    """The block ids a local checkpoint folder would have in the zoo (None: not one)."""
    from blockllm.zoo.errors import ZooError
    from blockllm.zoo.hashing import block_id
    from blockllm.zoo.importer import Checkpoint, read_json

    try:
        lay = layout(read_json(folder / "config.json", "config.json"))
        with Checkpoint(folder) as ckpt:
            ckpt.add_prefix(lay)
            return tuple(
                block_id({s.rel: ckpt.get(s.hf_key) for s in specs}) for specs in lay.positions
            )
    except (ZooError, OSError, KeyError) as e:
        logger.info("[import] %s is not a checkpoint to compare with (%s)", folder, e)
        return None


def resolve_base(zoo: Zoo, cfg: dict[str, Any], base: str | None, src: Path) -> ModelManifest:
    """The zoo model the adapter sits on: `base`, else the config's base_model_name_or_path
    matched to a model by name (or its last path component), else by content (a local
    checkpoint folder whose blocks are some model's chain). Raises UnknownModelError."""
    if base is not None:
        m = zoo.manifest(base)
    else:
        models = {n: m for n, m in zoo.manifests().items() if m.adapter is None}
        ref = str(cfg.get("base_model_name_or_path") or "")
        found = [models[n] for n in dict.fromkeys((ref, Path(ref).name)) if n in models]
        if not found and ref and Path(ref).is_dir():
            chain = _checkpoint_chain(Path(ref))
            found = [m for m in models.values() if chain is not None and m.chain == chain]
        if not found:
            known = ", ".join(sorted(models)) or "none"
            raise UnknownModelError(
                f"{src}: base model {ref or '(none named)'!r} of the adapter is not in the zoo "
                f"by name or content; import it first or pass --base MODEL (models: {known})"
            )
        m = found[0]
        logger.info("[import] adapter base %r is zoo model %s", ref, m.name)
    if m.adapter is not None:
        raise UnsupportedModelError(f"base {m.name!r} is itself an adapter; pick a full model")
    return m


def _module_position(lay: Layout, module: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (chain position 4, 'self_attn.q_proj')."""
    for p in range(1, lay.num_layers + 1):
        prefix = lay.hf_key(p, "")
        if module.startswith(prefix):
            rel = module[len(prefix) :]
            if rel.rsplit(".", 1)[-1] not in LORA_TARGETS:
                break
            return p, rel
    raise UnsupportedModelError(
        f"LoRA on {module!r} is not supported: only these projections of decoder layers are: "
        + ", ".join(LORA_TARGETS)
    )


def _read_tensors(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = src / ADAPTER_WEIGHTS
    if not path.is_file():
        bin_only = (src / "adapter_model.bin").is_file()
        extra = " (adapter_model.bin is not supported)" if bin_only else ""
        raise CheckpointError(f"{path} not found{extra}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own types for bad files
        raise CheckpointError(f"cannot read {path}: {e}") from e


def adapter_blocks(
    cfg: dict[str, Any], tensors: dict[str, torch.Tensor], lay: Layout
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, int]]:
    """Per chain position, the adapter block's tensors; and each module's rank. Every tensor
    is checked against the base's shapes; an unknown key is an error."""
    specs = lay.specs()
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise UnsupportedModelError(
                f"unexpected adapter tensor {key} (only lora_A/lora_B of Linear modules)"
            )
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    for module, ab in sorted(pairs.items()):
        p, rel = _module_position(lay, module)
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"adapter module {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        spec = specs.get(f"{module}.weight")
        if spec is None or len(spec[1].shape) != 2:
            raise CheckpointError(f"adapter module {module} is not a Linear of the base")
        out_f, in_f = spec[1].shape
        if FAMILIES[lay.model_type].conv1d:
            in_f, out_f = out_f, in_f
        r, scaling = lora_scaling(cfg, module)
        if a.dtype not in DTYPES or b.dtype != a.dtype:
            raise CheckpointError(f"adapter module {module}: dtypes {a.dtype}, {b.dtype}")
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise CheckpointError(
                f"adapter module {module}: lora_A {list(a.shape)}, lora_B {list(b.shape)}; "
                f"the base and the config (r={r}) imply [{r}, {in_f}] and [{out_f}, {r}]"
            )
        blocks.setdefault(p, {}).update(
            {
                f"{rel}.lora_A": a,
                f"{rel}.lora_B": b,
                f"{rel}.scaling": torch.tensor(scaling, dtype=torch.float32),
            }
        )
        ranks[module] = r
    if not blocks:
        raise CheckpointError("the adapter holds no LoRA tensors")
    return blocks, ranks


def import_adapter(
    zoo: Zoo,
    src: Path,
    name: str,
    *,
    base: str | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> ModelManifest:
    """Import the PEFT adapter folder `src` as model `name`; raises a ZooError subclass."""
    from blockllm.zoo.importer import blockllm_version

    validate_name(name)
    if not src.is_dir():
        raise CheckpointError(f"adapter folder not found: {src}")
    cfg = _read_config(src)
    if not force and zoo.has_model(name):
        raise ModelExistsError(f"model {name!r} already exists in the zoo; use --force to replace")
    tensors = _read_tensors(src)
    with zoo.shared_lock():  # gc may not run until our manifest references the blocks
        bm = resolve_base(zoo, cfg, base, src)
        blocks, ranks = adapter_blocks(cfg, tensors, layout(bm.config))
        ids: list[str | None] = [None] * len(bm.chain)
        sizes: list[int] = [0] * len(bm.chain)
        written = 0
        for i, (p, block) in enumerate(sorted(blocks.items())):
            stored = zoo.put_block(block)
            ids[p], sizes[p] = stored.id, stored.nbytes
            written += stored.nbytes if stored.written else 0
            if progress is not None:
                progress(i + 1, len(blocks))
        dtype = DTYPES[next(iter(tensors.values())).dtype]
        m = ModelManifest(
            name=name,
            model_type=bm.model_type,
            config=bm.config,
            chain=bm.chain,
            tie_word_embeddings=bm.tie_word_embeddings,
            dtype=bm.dtype,
            generation=bm.generation,
            tokenizer=bm.tokenizer,
            source={
                "path": str(src.resolve()),
                "files": [ADAPTER_CONFIG, ADAPTER_WEIGHTS],
                "imported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "blockllm_version": blockllm_version(),
                "block_bytes": list(bm.block_bytes),
                "written_bytes": written,
                "base": bm.name,
            },
            fingerprint=bm.fingerprint,
            adapter={
                "base": bm.name,
                "blocks": ids,
                "block_bytes": sizes,
                "config": cfg,
                "ranks": ranks,
                "targets": sorted({k.rsplit(".", 1)[-1] for k in ranks}),
                "dtype": dtype,
            },
        )
        zoo.publish_manifest(m, force=force)
    logger.info(
        "[import] adapter %s on %s: %d layers, ranks %s",
        name,
        bm.name,
        len(blocks),
        sorted(set(ranks.values())),
    )
    return m


def export_adapter(zoo: Zoo, m: ModelManifest, out: Path) -> Path:
    """Write adapter `m` as a PEFT adapter folder `out` (new or empty) that
    `PeftModel.from_pretrained(base, out)` loads with the imported tensors."""
    from safetensors.torch import save_file

    assert m.adapter is not None
    lay = layout(m.config)
    sd: dict[str, torch.Tensor] = {}
    for p, bid in m.adapter_blocks:
        for rel, t in zoo.load_block(bid).items():
            module, kind = rel.rsplit(".", 1)
            if kind in ("lora_A", "lora_B"):
                sd[f"base_model.model.{lay.hf_key(p, module)}.{kind}.weight"] = t
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / ADAPTER_WEIGHTS, lambda tmp: save_file(sd, str(tmp), {"format": "pt"}))
    doc = json.dumps(m.adapter["config"], indent=2) + "\n"
    atomic_write_bytes(out / ADAPTER_CONFIG, doc.encode())
    logger.info("[export] adapter %s: %d tensors -> %s", m.name, len(sd), out)
    return out
