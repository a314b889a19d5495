"""The zoo on disk: content-addressed blocks, manifests, tokenizers and their locks.

Layout under the root:
    blocks/<id[:2]>/<id>.safetensors    one block (relative tensor names), id = block_id()
    models/<name>.json                  ModelManifest
    tokenizers/<digest>/                tokenizer files, stored once per content
    equivalence/<a>-<b>.json            equivalence records (zoo/equiv.py)
    locks/collect.lock                  shared: import, readers; exclusive: gc
    locks/manifests.lock                exclusive: manifest create/replace/remove, gc

Why two locks: an import writes blocks for a long time under a *shared* collect lock (so
imports run concurrently and gc, which needs it exclusive, can never delete a block an
in-flight import will reference), and takes the manifests lock exclusively only to publish
its manifest. Lock order is always collect, then manifests.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from blockllm.zoo.errors import IntegrityError, UnknownModelError, ZooError
from blockllm.zoo.fsutil import atomic_install_dir, atomic_write, atomic_write_bytes, flocked
from blockllm.zoo.hashing import block_id, files_digest
from blockllm.zoo.manifest import ModelManifest, validate_name

if TYPE_CHECKING:
    from blockllm.zoo.equiv import EquivResult
    from blockllm.zoo.equiv_store import EquivalenceRecord
    from blockllm.zoo.maintenance import GcReport, VerifyReport

logger = logging.getLogger(__name__)

_BLOCK_ID = re.compile(r"[0-9a-f]{64}")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
Progress = Callable[[int, int], None]


class StoredBlock(NamedTuple):
    id: str
    nbytes: int  # size of the block file
    written: bool  # False: it was already present (dedup)


class ModelExistsError(ZooError):
    """A model of that name is already in the zoo (pass force=True to replace it)."""


def check_block_id(bid: str) -> str:
    if not isinstance(bid, str) or not _BLOCK_ID.fullmatch(bid):
        raise ZooError(f"invalid block id {bid!r}: expected 64 lowercase hex digits")
    return bid


class Zoo:
    """A zoo directory (created if absent). Safe to use from several processes at once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ZooError(f"zoo path {self.root} exists and is not a directory")
        for sub in ("blocks", "models", "tokenizers", "equivalence", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for lock in ("collect.lock", "manifests.lock"):
            (self.root / "locks" / lock).touch(exist_ok=True)

    def __repr__(self) -> str:
        return f"Zoo({str(self.root)!r})"

    # -- locks ---------------------------------------------------------------------------
    def shared_lock(self) -> contextlib.AbstractContextManager[None]:
        """Readers and importers: blocks present now stay present while held."""
        return flocked(self.root / "locks" / "collect.lock", exclusive=False)

    def collect_lock(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive: no import or reader is running (gc)."""
        return flocked(self.root / "locks" / "collect.lock", exclusive=True)

    def manifests_lock(self) -> contextlib.AbstractContextManager[None]:
        return flocked(self.root / "locks" / "manifests.lock", exclusive=True)

    # -- blocks --------------------------------------------------------------------------
    def block_path(self, bid: str) -> Path:
        check_block_id(bid)
        return self.root / "blocks" / bid[:2] / f"{bid}.safetensors"

    def has_block(self, bid: str) -> bool:
        return self.block_path(bid).is_file()

    def block_nbytes(self, bid: str) -> int:
        """Size of the stored block file; IntegrityError if it is missing."""
        try:
            return self.block_path(bid).stat().st_size
        except FileNotFoundError:
            raise IntegrityError(f"block {bid} is missing from the zoo") from None

    def iter_block_files(self) -> Iterator[Path]:
        """Every complete block file on disk (temp files excluded)."""
        for sub in sorted((self.root / "blocks").iterdir()):
            if sub.is_dir():
                yield from sorted(sub.glob("*.safetensors"))

    def put_block(self, tensors: Mapping[str, torch.Tensor]) -> StoredBlock:
        """Store a block unless already present (the dedup).

        The caller holds `shared_lock()` until a manifest references the block.
        """
        from safetensors.torch import save_file

        bid = block_id(tensors)
        path = self.block_path(bid)
        written = not path.is_file()
        if written:
            path.parent.mkdir(exist_ok=True)
            data = {k: v.contiguous() for k, v in tensors.items()}
            atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata={"format": "pt"}))
            logger.debug("[block] wrote %s (%d bytes)", bid, path.stat().st_size)
        return StoredBlock(bid, path.stat().st_size, written)

    def load_block(
        self, block_id: str, device: str | torch.device = "cpu", verify: bool = True
    ) -> dict[str, torch.Tensor]:
        """The block's tensors by relative name; IntegrityError if missing or (verify) corrupt.

        Any thread or process may call this; it holds the shared lock while reading.
        """
        from safetensors import safe_open

        from blockllm.zoo.hashing import block_id as compute_id

        path = self.block_path(block_id)
        with self.shared_lock():
            if not path.is_file():
                raise IntegrityError(f"block {block_id} is missing from the zoo")
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            except Exception as e:  # safetensors raises its own types for bad headers
                raise IntegrityError(f"block {block_id} is unreadable: {e}") from e
        if verify and (got := compute_id(tensors)) != block_id:
            raise IntegrityError(f"block {block_id} is corrupt (its content hashes to {got})")
        if torch.device(device).type != "cpu":
            tensors = {k: v.to(device) for k, v in tensors.items()}
        return tensors

    # -- manifests -----------------------------------------------------------------------
    def _manifest_path(self, name: str) -> Path:
        return self.root / "models" / f"{validate_name(name)}.json"

    def list_models(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "models").glob("*.json"))

    def has_model(self, name: str) -> bool:
        return self._manifest_path(name).is_file()

    def manifest(self, name: str) -> ModelManifest:
        """The model's manifest; UnknownModelError if there is none."""
        path = self._manifest_path(name)
        try:
            text = path.read_text()
        except FileNotFoundError:
            known = ", ".join(self.list_models()) or "none"
            raise UnknownModelError(f"unknown model {name!r} (in zoo: {known})") from None
        return ModelManifest.from_json(text, where=str(path))

    def manifests(self) -> dict[str, ModelManifest]:
        """Every manifest by name (a model removed while listing is left out)."""
        out = {}
        for name in self.list_models():
            with contextlib.suppress(UnknownModelError):
                out[name] = self.manifest(name)
        return out

    def publish_manifest(self, m: ModelManifest, *, force: bool = False) -> None:
        """Write `models/<name>.json` atomically; ModelExistsError unless force.

        The caller holds `shared_lock()` (the blocks it references are then safe from gc).
        """
        for bid in m.all_blocks():
            if not self.has_block(bid):
                raise IntegrityError(f"manifest {m.name!r} references missing block {bid}")
        path = self._manifest_path(m.name)
        with self.manifests_lock():
            if path.exists() and not force:
                raise ModelExistsError(
                    f"model {m.name!r} already exists in the zoo; use --force to replace it"
                )
            atomic_write_bytes(path, m.to_json().encode())
        logger.info("[manifest] published %s (%d blocks)", m.name, len(m.chain))

    def remove(self, name: str) -> None:
        """Delete a model's manifest; its blocks stay until gc. UnknownModelError if absent."""
        path = self._manifest_path(name)
        with self.manifests_lock():
            try:
                path.unlink()
            except FileNotFoundError:
                raise UnknownModelError(f"unknown model {name!r}") from None
        logger.info("[rm] removed model %s", name)

    # -- tokenizers ----------------------------------------------------------------------
    def put_tokenizer(self, src: Path) -> str | None:
        """Store the tokenizer files of a checkpoint folder once by content; None if none."""
        files = [(n, (src / n).read_bytes()) for n in TOKENIZER_FILES if (src / n).is_file()]
        if not files:
            return None
        digest = files_digest(files)
        final = self.root / "tokenizers" / digest
        if not final.is_dir():

            def fill(tmp: Path) -> None:
                for fname, data in files:
                    (tmp / fname).write_bytes(data)

            atomic_install_dir(final, fill)
        return digest

    def tokenizer_path(self, digest: str) -> Path:
        if not _BLOCK_ID.fullmatch(digest):
            raise IntegrityError(f"invalid tokenizer id {digest!r}")
        return self.root / "tokenizers" / digest

    def tokenizer_dir(self, name: str) -> Path | None:
        """A folder AutoTokenizer.from_pretrained loads; None if the model has no tokenizer."""
        m = self.manifest(name)
        if m.tokenizer is None:
            return None
        path = self.tokenizer_path(m.tokenizer)
        if not path.is_dir():
            raise IntegrityError(f"tokenizer {m.tokenizer} of model {name!r} is missing")
        return path

    def copy_tokenizer(self, name: str, out_dir: Path) -> None:
        src = self.tokenizer_dir(name)
        if src is not None:
            for f in src.iterdir():
                shutil.copyfile(f, out_dir / f.name)

    # -- operations implemented in their own modules --------------------------------------
    def import_checkpoint(
        self,
        path: str | Path,
        name: str,
        progress: Progress | None = None,
        *,
        force: bool = False,
    ) -> ModelManifest:
        """Import a local HF checkpoint folder as model `name` (see zoo/importer.py)."""
        from blockllm.zoo.importer import import_checkpoint

        return import_checkpoint(self, Path(path), name, progress=progress, force=force)

    def import_adapter(
        self,
        path: str | Path,
        name: str,
        progress: Progress | None = None,
        *,
        base: str | None = None,
        force: bool = False,
    ) -> ModelManifest:
        """Import a PEFT LoRA adapter folder as model `name` on top of zoo model `base` (or the
        one its config names; see zoo/adapters.py)."""
        from blockllm.zoo.adapters import import_adapter

        return import_adapter(self, Path(path), name, base=base, progress=progress, force=force)

    def export(self, name: str, out_dir: str | Path) -> Path:
        """Write model `name` as a HF checkpoint folder, or an adapter as a PEFT adapter
        folder (see zoo/export.py, zoo/adapters.py)."""
        from blockllm.zoo.export import export_model

        return export_model(self, name, Path(out_dir))

    def du(self) -> dict[str, Any]:
        from blockllm.zoo.maintenance import disk_usage

        return disk_usage(self)

    def verify(self) -> VerifyReport:
        """Re-hash every block and tokenizer; a VerifyReport (see zoo/maintenance.py)."""
        from blockllm.zoo.maintenance import verify

        return verify(self)

    def gc(self) -> GcReport:
        """Remove unreferenced blocks/tokenizers and stale temp files; a GcReport."""
        from blockllm.zoo.maintenance import collect_garbage

        return collect_garbage(self)

    def measure_equivalence(
        self,
        *,
        prompts: int = 8,
        seq_len: int = 32,
        force: bool = False,
        progress: Progress | None = None,
    ) -> EquivResult:
        """Measure and store equivalence of unmeasured block pairs; an EquivResult."""
        from blockllm.zoo.equiv import measure_all

        return measure_all(self, prompts=prompts, seq_len=seq_len, force=force, progress=progress)

    def equivalences(self) -> list[EquivalenceRecord]:
        """Every stored EquivalenceRecord (see zoo/equiv.py)."""
        from blockllm.zoo.equiv_store import EquivalenceStore

        return EquivalenceStore(self).all()

    def equivalence(self, original: str, substitute: str) -> EquivalenceRecord | None:
        """The EquivalenceRecord for substituting `substitute` for `original`, or None."""
        from blockllm.zoo.equiv_store import EquivalenceStore

        return EquivalenceStore(self).get(check_block_id(original), check_block_id(substitute))
