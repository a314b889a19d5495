"""HF checkpoint folder -> blocks + manifest, one block in memory at a time.

Every key of the checkpoint is mapped explicitly (zoo/families.py) and every shape and dtype is
checked against the config before the first block is written: a missing, extra or misshapen
tensor is a CheckpointError naming it, never a silent skip.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from blockllm.zoo.errors import CheckpointError, UnsupportedModelError
from blockllm.zoo.families import Layout, config_aliases, fingerprint, layout, position_name
from blockllm.zoo.manifest import ModelManifest, validate_name
from blockllm.zoo.store import ModelExistsError, Progress, Zoo

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def blockllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blockllm")
    except PackageNotFoundError:
        return "unknown"


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return doc


def _shard_files(src: Path) -> tuple[list[str], dict[str, str] | None]:
    """(shard file names, key -> file from the index or None when there is no index)."""
    index = src / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, "index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (src / f).is_file():
                raise CheckpointError(f"shard {f} listed in {INDEX_FILE} is missing")
        return files, dict(weight_map)
    files = sorted(p.name for p in src.glob("*.safetensors"))
    if not files:
        extra = " (only .bin weights, which are not supported)" if any(src.glob("*.bin")) else ""
        raise CheckpointError(f"no *.safetensors weights in {src}{extra}")
    return files, None


class Checkpoint(contextlib.ExitStack):
    """Open safetensors shards of one folder: key -> handle, read lazily (memory-mapped)."""

    def __init__(self, src: Path) -> None:
        from safetensors import safe_open

        super().__init__()
        self.src = src
        files, weight_map = _shard_files(src)
        self.handles = {}
        self.where: dict[str, str] = {}
        self.original: dict[str, str] = {}  # our key -> the file's, where add_prefix renamed
        for fname in files:
            try:
                h = self.enter_context(safe_open(str(src / fname), framework="pt", device="cpu"))
            except Exception as e:
                raise CheckpointError(f"cannot read {src / fname}: {e}") from e
            self.handles[fname] = h
            for key in h.keys():  # noqa: SIM118
                if weight_map is not None and weight_map.get(key) != fname:
                    continue  # the index is authoritative: unlisted copies are not ours
                if key in self.where:
                    raise CheckpointError(
                        f"tensor {key} is stored in both {self.where[key]} and {fname}"
                    )
                self.where[key] = fname
        if weight_map is not None:
            for key, fname in weight_map.items():
                if key not in self.where:
                    raise CheckpointError(f"tensor {key} listed in {INDEX_FILE} is not in {fname}")

    def add_prefix(self, lay: Layout) -> None:
        """Checkpoints saved from the base model alone (the hub's original GPT-2: `h.0...`,
        `wte.weight`) name tensors without the base model's prefix; HF adds it on load, and
        so do we, when no key has it and every prefixed name is one the layout expects."""
        prefix = f"{lay.prefix}."
        specs = lay.specs()
        if any(k.startswith(prefix) for k in self.where):
            return
        renamed = {prefix + k: f for k, f in self.where.items()}
        if any(k in specs for k in renamed):
            self.original = {prefix + k: k for k in self.where}
            self.where = renamed

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        sl = self.handles[self.where[key]].get_slice(self.original.get(key, key))
        return tuple(sl.get_shape()), sl.get_dtype()

    def get(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].get_tensor(self.original.get(key, key))


def check_keys(ckpt: Checkpoint, lay: Layout) -> str:
    """Names of missing/extra/misshapen tensors as errors; returns the model's dtype: the
    common one, or for a checkpoint whose tensors mix dtypes (fp32 norms next to bf16
    matrices) the one holding the most bytes, which workers serve it in (each block is
    stored with its own tensors' dtypes, as imported)."""
    specs = lay.specs()
    missing = sorted(set(specs) - set(ckpt.where))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"missing tensor {', '.join(missing[:5])}{more}")
    dtypes: dict[str, int] = {}  # dtype -> bytes
    for key in sorted(ckpt.where):
        if key in specs:
            shape, st_dtype = ckpt.shape_dtype(key)
            want = specs[key][1].shape
            if shape != want:
                raise CheckpointError(
                    f"tensor {key} has shape {list(shape)}, config implies {list(want)}"
                )
            if st_dtype not in DTYPES:
                raise UnsupportedModelError(
                    f"tensor {key} has dtype {st_dtype}; supported: float32, bfloat16, float16"
                )
            size = math.prod(shape) * (4 if DTYPES[st_dtype] == "float32" else 2)
            dtypes[DTYPES[st_dtype]] = dtypes.get(DTYPES[st_dtype], 0) + size
        elif key == _tied_key(lay) and lay.tie_word_embeddings:
            continue  # checked for equality with the embedding while importing
        elif lay.ignored(key):
            logger.info("[import] ignoring %s (a non-persistent buffer HF drops on load)", key)
        else:
            raise CheckpointError(f"unexpected tensor {key} for model_type {lay.model_type!r}")
    dtype = max(sorted(dtypes), key=dtypes.__getitem__)
    if len(dtypes) > 1:
        logger.info("[import] tensors in %s (bytes): served as %s", dtypes, dtype)
    return dtype


def _tied_key(lay: Layout) -> str:
    return f"{lay.lm_head}.weight"


def _check_tied_head(ckpt: Checkpoint, lay: Layout, embed: torch.Tensor) -> None:
    """A tied checkpoint may still store lm_head.weight: accept it only if equal to embed."""
    key = _tied_key(lay)
    if key in ckpt.where:
        head = ckpt.get(key)
        if head.shape != embed.shape or not torch.equal(head, embed):
            raise CheckpointError(
                f"tie_word_embeddings is true but {key} differs from {lay.tied_rel}"
            )
        logger.info("[import] tied %s equals the embedding: stored once", key)


def _write_blocks(
    zoo: Zoo, ckpt: Checkpoint, lay: Layout, progress: Progress | None
) -> tuple[list[str], list[int], int]:
    chain: list[str] = []
    sizes: list[int] = []
    written = 0
    total = len(lay.positions)
    for p, specs in enumerate(lay.positions):
        tensors = {s.rel: ckpt.get(s.hf_key) for s in specs}
        if p == 0 and lay.tie_word_embeddings:
            _check_tied_head(ckpt, lay, tensors[lay.tied_rel])
        stored = zoo.put_block(tensors)
        del tensors  # one block in memory at a time
        chain.append(stored.id)
        sizes.append(stored.nbytes)
        written += stored.nbytes if stored.written else 0
        logger.debug("[import] %s -> %s", position_name(p, lay.num_layers), stored.id[:12])
        if progress is not None:
            progress(p + 1, total)
    return chain, sizes, written


def import_checkpoint(
    zoo: Zoo, src: Path, name: str, *, progress: Progress | None = None, force: bool = False
) -> ModelManifest:
    """Import the checkpoint folder `src` as `name`; raises a ZooError subclass on failure."""
    validate_name(name)
    if not src.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {src}")
    config = read_json(src / "config.json", "config.json")
    lay = layout(config)
    # GPT-2 style names (n_embd, ...) also stored under the usual ones; export drops them again
    aliases = config_aliases(config)
    config = {**config, **aliases}
    if not force and zoo.has_model(name):
        raise ModelExistsError(f"model {name!r} already exists in the zoo; use --force to replace")
    gen_path = src / "generation_config.json"
    generation = read_json(gen_path, "generation_config.json") if gen_path.is_file() else {}
    with Checkpoint(src) as ckpt:
        ckpt.add_prefix(lay)
        dtype = check_keys(ckpt, lay)
        logger.info(
            "[import] %s: %s %s, %d blocks", name, lay.model_type, dtype, len(lay.positions)
        )
        with zoo.shared_lock():  # gc may not run until our manifest references the blocks
            chain, sizes, written = _write_blocks(zoo, ckpt, lay, progress)
            m = ModelManifest(
                name=name,
                model_type=lay.model_type,
                config=config,
                chain=tuple(chain),
                tie_word_embeddings=lay.tie_word_embeddings,
                dtype=dtype,
                generation=generation,
                tokenizer=zoo.put_tokenizer(src),
                source={
                    "path": str(src.resolve()),
                    "files": sorted(ckpt.handles),
                    "imported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "blockllm_version": blockllm_version(),
                    "block_bytes": sizes,
                    "written_bytes": written,
                    "config_aliases": sorted(aliases),
                },
                fingerprint=fingerprint(config),
            )
            zoo.publish_manifest(m, force=force)
    return m
