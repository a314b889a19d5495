"""Serving the broker's zoo to workers, one bounded chunk at a time (FETCH -> BLOB).

A new node needs only the broker's address and keys: its worker asks for the manifests and
block files it lacks over its connection to the broker (`worker/fetch.py`). The broker reads at
most `CHUNK_BYTES` per message from its zoo under the zoo's shared lock (gc cannot remove a
file mid-read) and never holds more than one chunk per request.
"""

from __future__ import annotations

from pathlib import Path

from blockllm.broker.protocol import Blob, Error, ErrorCode, Fetch, TensorMeta

CHUNK_BYTES = 4 << 20


def zoo_object_path(zoo_dir: str | Path, what: str, name: str) -> Path:
    """The file of a zoo object by kind and name; ValueError for a bad kind or name."""
    from blockllm.zoo import Zoo
    from blockllm.zoo.store import check_block_id

    zoo = Zoo(zoo_dir)
    if what == "manifest":
        return zoo._manifest_path(name)  # validate_name refuses path tricks
    if what == "block":
        return zoo.block_path(check_block_id(name))
    if what == "tokenizer":  # name: "<tokenizer id>/<one of TOKENIZER_FILES>"
        from blockllm.zoo.store import TOKENIZER_FILES

        digest, _, fname = name.partition("/")
        if fname not in TOKENIZER_FILES:
            raise ValueError(f"not a tokenizer file: {fname!r}")
        return zoo.tokenizer_path(digest) / fname
    raise ValueError(f"cannot fetch {what!r} (manifest, block or tokenizer)")


def serve_fetch(zoo_dir: str | Path | None, msg: Fetch) -> tuple[Blob | Error, bytes | None]:
    """The answer to one FETCH: a BLOB and its chunk, or an ERROR (never raises)."""
    if not zoo_dir:
        return Error(msg.request_id, ErrorCode.BAD_REQUEST.value, "broker has no zoo"), None
    try:
        path = zoo_object_path(zoo_dir, msg.what, msg.name)
    except Exception as e:  # ZooError / ValueError from the name checks
        return Error(msg.request_id, ErrorCode.BAD_REQUEST.value, str(e)), None
    length = CHUNK_BYTES if msg.length <= 0 else min(msg.length, CHUNK_BYTES)
    from blockllm.zoo import Zoo

    try:
        with Zoo(zoo_dir).shared_lock(), path.open("rb") as f:
            total = f.seek(0, 2)
            if not 0 <= msg.offset <= total:
                raise ValueError(f"offset {msg.offset} outside 0..{total}")
            f.seek(msg.offset)
            data = f.read(length)
    except FileNotFoundError:
        code = ErrorCode.UNKNOWN_MODEL if msg.what == "manifest" else ErrorCode.BAD_REQUEST
        return Error(msg.request_id, code.value, f"no {msg.what} {msg.name!r} in the zoo"), None
    except ValueError as e:
        return Error(msg.request_id, ErrorCode.BAD_REQUEST.value, str(e)), None
    meta = TensorMeta("uint8", (len(data),))
    return Blob(msg.request_id, msg.what, msg.name, msg.offset, total, (meta,)), data
