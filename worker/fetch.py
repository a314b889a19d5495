"""Pulling what the local zoo lacks from the broker's zoo before the worker loads its stages.

For each configured model without a local manifest: FETCH the manifest, then every block of
its chain that is absent, chunk by chunk (`broker/fetch.py` caps a chunk at 4 MiB), streaming
into a temp file next to the zoo's blocks (memory: one chunk, then one block while it is
stored). Each block is re-stored through `Zoo.put_block`, which hashes the canonical tensor
content: a block whose id differs from the one asked for is an error, never stored. The
manifest is published last, so the zoo never names a block it does not hold.

Runs on the worker's main thread before its IO thread starts, on a short-lived DEALER with the
worker's keys to the same broker endpoint.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import zmq

from blockllm.broker import frames
from blockllm.broker.protocol import Blob, Error, Fetch
from blockllm.broker.sockets import make_socket
from blockllm.worker.config import WorkerProcConfig

logger = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 30.0  # per chunk


class FetchError(RuntimeError):
    """The broker could not give us an object (or gave us a corrupt one)."""


class FetchRefused(FetchError):
    """The broker answered ERROR: it has no such object (or refused the name)."""


def _fetch_to(sock: zmq.Socket, what: str, name: str, write: Callable[[bytes], None]) -> int:
    """Stream object `what`/`name` from the broker into `write`; returns its size."""
    offset, total = 0, None
    while total is None or offset < total:
        rid = secrets.token_hex(8)
        sock.send_multipart(frames.encode(Fetch(rid, what, name, offset)))
        deadline = time.monotonic() + FETCH_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000)):
                raise FetchError(f"broker did not answer FETCH {what} {name} @ {offset}")
            msg, tensors = frames.decode(sock.recv_multipart(copy=False))
            if getattr(msg, "request_id", None) == rid:
                break  # anything else is a stale answer to an abandoned fetch
        if isinstance(msg, Error):
            raise FetchRefused(f"broker refused {what} {name}: {msg.code} {msg.message}")
        if not isinstance(msg, Blob) or msg.offset != offset or len(tensors) != 1:
            raise FetchError(f"bad answer to FETCH {what} {name}: {type(msg).__name__}")
        data = tensors[0].numpy().tobytes()
        if not data and offset < msg.total:
            raise FetchError(f"empty chunk of {what} {name} at {offset} of {msg.total}")
        write(data)
        offset += len(data)
        total = msg.total
    return offset


def _fetch_block(sock: zmq.Socket, zoo: Any, bid: str) -> int:
    from safetensors.torch import load_file

    from blockllm.zoo.fsutil import temp_path

    path = zoo.block_path(bid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with tmp.open("wb") as f:
            size = _fetch_to(sock, "block", bid, f.write)
        stored = zoo.put_block(load_file(str(tmp)))
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if stored.id != bid:
        with zoo.collect_lock():
            zoo.block_path(stored.id).unlink(missing_ok=True)
        raise FetchError(f"block {bid} arrived with content hashing to {stored.id}")
    return size


def _fetch_tokenizer(sock: zmq.Socket, zoo: Any, digest: str) -> int:
    """The tokenizer folder `digest`: each known file the broker has, re-stored by content."""
    import tempfile

    from blockllm.zoo.store import TOKENIZER_FILES

    size = 0
    with tempfile.TemporaryDirectory(dir=zoo.root, prefix=".fetch-") as tmp:
        for fname in TOKENIZER_FILES:  # small files (a few MiB at most): held whole
            buf = bytearray()
            try:
                size += _fetch_to(sock, "tokenizer", f"{digest}/{fname}", buf.extend)
            except FetchRefused:
                continue  # the broker's tokenizer has no such file
            Path(tmp, fname).write_bytes(buf)
        got = zoo.put_tokenizer(Path(tmp))
    if got != digest:
        raise FetchError(f"tokenizer {digest} arrived with content hashing to {got}")
    return size


def _tokenizer_missing(zoo: Any, m: Any) -> bool:
    return m.tokenizer is not None and not zoo.tokenizer_path(m.tokenizer).is_dir()


def _complete(zoo: Any, name: str) -> bool:
    if not zoo.has_model(name):
        return False
    m = zoo.manifest(name)
    return all(zoo.has_block(b) for b in m.chain) and not _tokenizer_missing(zoo, m)


def fetch_models(cfg: WorkerProcConfig, zoo: Any, models: Iterable[str]) -> int:
    """Make every model in `models` complete in `zoo`, pulling from the broker; bytes fetched.

    Raises FetchError (broker refused, timed out, hash mismatch) or a ZooError.
    """
    from blockllm.zoo.manifest import ModelManifest

    todo = [m for m in dict.fromkeys(models) if not _complete(zoo, m)]
    if not todo:
        return 0
    curve = None
    if cfg.keys_dir:
        from blockllm.broker.security import load_client_keys

        curve = load_client_keys(cfg.keys_dir)
    ctx = zmq.Context.instance()
    sock = make_socket(ctx, zmq.DEALER, cfg.broker, bind=False, curve=curve)
    fetched = 0
    try:
        for name in todo:
            local = zoo.has_model(name)
            if local:
                m = zoo.manifest(name)
            else:
                buf = bytearray()
                fetched += _fetch_to(sock, "manifest", name, buf.extend)
                m = ModelManifest.from_json(buf.decode(), where=f"broker:{name}")
            with zoo.shared_lock():  # gc must not remove fetched blocks before the manifest
                for bid in dict.fromkeys(m.chain):
                    if not zoo.has_block(bid):
                        fetched += _fetch_block(sock, zoo, bid)
                if _tokenizer_missing(zoo, m):
                    fetched += _fetch_tokenizer(sock, zoo, m.tokenizer)
                if not local:
                    zoo.publish_manifest(m)
            logger.info("[fetch] %s: pulled from the broker's zoo (%d bytes so far)", name, fetched)
    finally:
        sock.close(linger=0)
    return fetched
