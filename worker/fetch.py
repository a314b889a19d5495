"""Pulling what the local zoo lacks from the broker's zoo, over the worker's own connection.

For each model a stage needs and the local zoo does not hold whole: FETCH the manifest, then
every block of its chain that is absent, chunk by chunk (`broker/fetch.py` caps a chunk at
4 MiB), streaming into a temp file next to the zoo's blocks. One chunk is in flight at a time,
so memory is one chunk, then one block while it is stored. Each block is re-stored through
`Zoo.put_block`, which hashes the canonical tensor content: a block whose id differs from the
one asked for is an error, never stored. The manifest is published last, so the zoo never
names a block it does not hold.

A corrupt block (bytes that do not parse, or tensors hashing to another id) fails the fetch
with `CorruptBlock`, naming the block and the source, before anything is stored: its content is
hashed from the temp file, never from the zoo, and no lock is taken on the error path (an
earlier version took the exclusive collect lock to delete what `put_block` had written while
still holding the shared one, and hung for ever).

Runs on the worker's loader thread (worker/loader.py). The FETCH goes out through the IO
thread, which owns the worker's one DEALER (`proc_io.IOThread.fetch`) and hands the BLOB or
ERROR answering it back to the caller, never to the compute loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from blockllm.broker.protocol import Blob, Error, Fetch

logger = logging.getLogger(__name__)

# Sends one FETCH and returns the answer (BLOB or ERROR) with its tensors; raises FetchError
# when none comes in time. `proc_io.IOThread.fetch` is the one the worker uses.
Ask = Callable[[Fetch], tuple[Any, list[torch.Tensor]]]


class FetchError(RuntimeError):
    """The broker could not give us an object (or gave us a corrupt one, or none in time)."""


class FetchRefused(FetchError):
    """The broker answered ERROR: it has no such object (or refused the name)."""


class CorruptBlock(FetchError):
    """A block arrived unreadable or with content hashing to another id (nothing stored).

    `block` is the id asked for, `source` where it came from; the worker reports the block as
    one it cannot get (READY `refused_blocks`), so the planner places its stages elsewhere."""

    def __init__(self, block: str, source: str, why: str) -> None:
        super().__init__(f"block {block} from {source} is corrupt: {why}")
        self.block = block
        self.source = source


def _fetch_to(ask: Ask, what: str, name: str, write: Callable[[memoryview], Any]) -> int:
    """Stream object `what`/`name` from the broker into `write`; returns its size."""
    offset, total = 0, None
    while total is None or offset < total:
        msg, tensors = ask(Fetch("", what, name, offset))
        if isinstance(msg, Error):
            raise FetchRefused(f"broker refused {what} {name}: {msg.code} {msg.message}")
        if not isinstance(msg, Blob) or msg.offset != offset or len(tensors) != 1:
            raise FetchError(f"bad answer to FETCH {what} {name}: {type(msg).__name__}")
        chunk = tensors[0]
        if chunk.dtype != torch.uint8 or chunk.dim() != 1:
            raise FetchError(f"bad chunk of {what} {name}: {chunk.dtype} {tuple(chunk.shape)}")
        n = chunk.numel()
        if (not n and offset < msg.total) or offset + n > msg.total:
            raise FetchError(f"bad chunk of {what} {name}: {n} bytes at {offset} of {msg.total}")
        if n:
            write(chunk.numpy().data)
        del chunk, tensors  # the view pins the received frame: let it go now
        offset += n
        total = msg.total
    return offset


def _fetch_block(ask: Ask, zoo: Any, bid: str, source: str) -> int:
    """Fetch block `bid` into a temp file, check its content hash, then store it; raises
    CorruptBlock (nothing stored) when the bytes do not parse or hash to another id."""
    from safetensors.torch import load_file

    from blockllm.zoo.fsutil import temp_path
    from blockllm.zoo.hashing import block_id

    path = zoo.block_path(bid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with tmp.open("wb") as f:
            size = _fetch_to(ask, "block", bid, f.write)
        try:
            tensors = load_file(str(tmp))
            got = block_id(tensors)
        except Exception as e:  # safetensors raises its own types for bad bytes
            raise CorruptBlock(bid, source, f"unreadable ({type(e).__name__}: {e})") from e
        if got != bid:
            raise CorruptBlock(bid, source, f"its content hashes to {got}")
        zoo.put_block(tensors)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return size


def _fetch_tokenizer(ask: Ask, zoo: Any, digest: str) -> int:
    """The tokenizer folder `digest`: each known file the broker has, re-stored by content
    (checked before it is stored: a mismatch stores nothing)."""
    import tempfile

    from blockllm.zoo.hashing import files_digest
    from blockllm.zoo.store import TOKENIZER_FILES

    size = 0
    files: list[tuple[str, bytes]] = []
    with tempfile.TemporaryDirectory(dir=zoo.root, prefix=".fetch-") as tmp:
        for fname in TOKENIZER_FILES:  # small files (a few MiB at most): held whole
            buf = bytearray()
            try:
                size += _fetch_to(ask, "tokenizer", f"{digest}/{fname}", buf.extend)
            except FetchRefused:
                continue  # the broker's tokenizer has no such file
            Path(tmp, fname).write_bytes(buf)
            files.append((fname, bytes(buf)))
        got = files_digest(files) if files else None
        if got != digest:
            raise FetchError(f"tokenizer {digest} arrived with content hashing to {got}")
        zoo.put_tokenizer(Path(tmp))
    return size


def _tokenizer_missing(zoo: Any, m: Any) -> bool:
    return m.tokenizer is not None and not zoo.tokenizer_path(m.tokenizer).is_dir()


def complete(zoo: Any, name: str) -> bool:
    """Whether the zoo holds model `name` whole: manifest, every block, its tokenizer."""
    if not zoo.has_model(name):
        return False
    m = zoo.manifest(name)
    return all(zoo.has_block(b) for b in m.chain) and not _tokenizer_missing(zoo, m)


def fetch_model(ask: Ask, zoo: Any, name: str, source: str = "the broker") -> int:
    """Make model `name` complete in `zoo`, pulling from the broker (`source`: its address, for
    errors); bytes fetched (0: it was).

    Raises FetchError (broker refused, silent; CorruptBlock: hash mismatch) or a ZooError.
    """
    from blockllm.zoo.manifest import ModelManifest

    if complete(zoo, name):
        return 0
    fetched = 0
    local = zoo.has_model(name)
    if local:
        m = zoo.manifest(name)
    else:
        buf = bytearray()
        fetched += _fetch_to(ask, "manifest", name, buf.extend)
        m = ModelManifest.from_json(buf.decode(), where=f"broker:{name}")
    with zoo.shared_lock():  # gc must not remove fetched blocks before the manifest
        for bid in dict.fromkeys(m.chain):
            if not zoo.has_block(bid):
                fetched += _fetch_block(ask, zoo, bid, source)
        if _tokenizer_missing(zoo, m):
            fetched += _fetch_tokenizer(ask, zoo, m.tokenizer)
        if not local:
            zoo.publish_manifest(m)  # last: the zoo never names a block it lacks
    logger.info("[fetch] %s: pulled %d bytes from the broker's zoo", name, fetched)
    return fetched


def fetch_blocks(ask: Ask, zoo: Any, ids: tuple[str, ...], source: str = "the broker") -> int:
    """Pull the blocks of `ids` the zoo lacks (a LoRA request's adapter blocks: no manifest of
    the adapter comes with them, its requests name them); bytes fetched. Raises as
    `fetch_model`. The caller holds `zoo.shared_lock()` until it has read them (no manifest
    names them here, so gc would take them)."""
    fetched = sum(_fetch_block(ask, zoo, b, source) for b in ids if not zoo.has_block(b))
    if fetched:
        logger.info("[fetch] %d adapter blocks: pulled %d bytes", len(ids), fetched)
    return fetched
