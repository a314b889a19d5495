"""Whole-zoo operations: disk usage, verification and garbage collection."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from blockllm.zoo.errors import IntegrityError
from blockllm.zoo.fsutil import is_temp
from blockllm.zoo.hashing import file_block_id, files_digest
from blockllm.zoo.manifest import ModelManifest
from blockllm.zoo.store import Zoo

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BadObject:
    """One failed check: `kind` is "block", "tokenizer" or "manifest"."""

    kind: str
    id: str
    reason: str
    models: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    blocks_checked: int
    tokenizers_checked: int
    models_checked: int
    bad: tuple[BadObject, ...]

    @property
    def ok(self) -> bool:
        return not self.bad

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True, slots=True)
class GcReport:
    removed_blocks: int
    freed_bytes: int
    removed_temp_files: int
    removed_tokenizers: int
    removed_equivalence: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def block_users(manifests: dict[str, ModelManifest]) -> dict[str, list[str]]:
    """Block id -> names of the models whose chain (or adapter) uses it."""
    users: dict[str, list[str]] = defaultdict(list)
    for name, m in manifests.items():
        for bid in dict.fromkeys(m.all_blocks()):
            users[bid].append(name)
    return users


def disk_usage(zoo: Zoo) -> dict[str, Any]:
    """logical/physical bytes, block counts and per-model logical/unique bytes.

    logical = sum over models of their chain's block sizes (a tied embedding counts once per
    model, as it is one chain position); physical = bytes of block files on disk.
    """
    sizes = {p.stem: p.stat().st_size for p in zoo.iter_block_files()}
    manifests = zoo.manifests()
    users = block_users(manifests)
    models: dict[str, dict[str, Any]] = {}
    for name, m in manifests.items():
        recorded = m.block_bytes
        chain_sizes = [
            sizes.get(bid, recorded[p] if p < len(recorded) else 0) for p, bid in enumerate(m.chain)
        ]
        adapter = [sizes.get(b, 0) for _, b in m.adapter_blocks]
        unique = sum(sizes.get(b, 0) for b in set(m.all_blocks()) if len(users[b]) == 1)
        models[name] = {
            "logical_bytes": sum(chain_sizes) + sum(adapter),
            "unique_bytes": unique,
            "layers": m.num_layers,
            "dtype": m.dtype,
            "model_type": m.model_type,
        }
        if m.adapter is not None:
            models[name]["adapter"] = {
                "base": m.adapter["base"],
                "bytes": sum(adapter),
                "layers": len(adapter),
                "ranks": sorted(set(m.adapter["ranks"].values())),
                "targets": m.adapter["targets"],
            }
    return {
        "logical_bytes": sum(v["logical_bytes"] for v in models.values()),
        "physical_bytes": sum(sizes.values()),
        "blocks": len(sizes),
        "shared_blocks": sum(1 for u in users.values() if len(u) > 1),
        "unreferenced_blocks": sum(1 for b in sizes if b not in users),
        "models": models,
    }


def _read_manifests(zoo: Zoo, bad: list[BadObject]) -> dict[str, ModelManifest]:
    out = {}
    for name in zoo.list_models():
        try:
            out[name] = zoo.manifest(name)
        except IntegrityError as e:
            bad.append(BadObject("manifest", name, str(e), (name,)))
    return out


def _check_block(path: Path) -> str | None:
    try:
        got = file_block_id(path)
    except Exception as e:  # a damaged header is the safetensors library's own error type
        return f"unreadable: {e}"
    return None if got == path.stem else f"content hashes to {got}"


def verify(zoo: Zoo) -> VerifyReport:
    """Re-hash every block file and referenced tokenizer; report each bad or missing one."""
    bad: list[BadObject] = []
    with zoo.shared_lock():
        manifests = _read_manifests(zoo, bad)
        users = block_users(manifests)
        on_disk = set()
        for path in zoo.iter_block_files():
            on_disk.add(path.stem)
            if (reason := _check_block(path)) is not None:
                bad.append(BadObject("block", path.stem, reason, tuple(users.get(path.stem, ()))))
        for bid in sorted(set(users) - on_disk):
            bad.append(BadObject("block", bid, "missing", tuple(users[bid])))
        tok_users: dict[str, list[str]] = defaultdict(list)
        for name, m in manifests.items():
            if m.tokenizer is not None:
                tok_users[m.tokenizer].append(name)
        for digest, names in sorted(tok_users.items()):
            folder = zoo.tokenizer_path(digest)
            if not folder.is_dir():
                bad.append(BadObject("tokenizer", digest, "missing", tuple(names)))
                continue
            got = files_digest((f.name, f.read_bytes()) for f in folder.iterdir())
            if got != digest:
                bad.append(BadObject("tokenizer", digest, f"content hashes to {got}", tuple(names)))
    for b in bad:
        logger.warning("[verify] bad %s %s (%s), used by %s", b.kind, b.id, b.reason, b.models)
    return VerifyReport(len(on_disk), len(tok_users), len(manifests), tuple(bad))


def _remove(path: Path) -> int:
    """Delete a file or folder; returns the bytes of a file removed (0 for folders)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        return 0
    size = path.stat().st_size
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return size


def _sweep_temps(zoo: Zoo) -> int:
    """Stale temp files everywhere: safe because gc holds the collect lock exclusively, so
    no writer is running."""
    n = 0
    for sub in ("models", "tokenizers", "equivalence"):
        for path in (zoo.root / sub).iterdir():
            if is_temp(path):
                _remove(path)
                n += 1
    for shard in (zoo.root / "blocks").iterdir():
        for path in shard.iterdir() if shard.is_dir() else ():
            if is_temp(path):
                _remove(path)
                n += 1
    return n


def collect_garbage(zoo: Zoo) -> GcReport:
    """Remove blocks and tokenizers no manifest references, stale temps, dangling records."""
    from blockllm.zoo.equiv_store import EquivalenceStore

    with zoo.collect_lock(), zoo.manifests_lock():
        manifests = {n: zoo.manifest(n) for n in zoo.list_models()}  # a bad one stops gc
        referenced = set(block_users(manifests))
        temps = _sweep_temps(zoo)
        removed = freed = 0
        for path in list(zoo.iter_block_files()):
            if path.stem not in referenced:
                freed += _remove(path)
                removed += 1
        for shard in (zoo.root / "blocks").iterdir():
            with contextlib.suppress(OSError):
                shard.rmdir()  # only succeeds when empty
        tokenizers = {m.tokenizer for m in manifests.values()}
        toks = 0
        for folder in (zoo.root / "tokenizers").iterdir():
            if folder.name not in tokenizers:
                _remove(folder)
                toks += 1
        records = EquivalenceStore(zoo).prune(referenced)
    report = GcReport(removed, freed, temps, toks, records)
    logger.info("[gc] %s", report)
    return report
