"""Serving the broker's zoo to workers, one bounded chunk at a time (FETCH -> BLOB).

A new node needs only the broker's address and keys: its worker asks for the manifests and
block files it lacks over its connection to the broker (`worker/fetch.py`), and the planner
asks for the "catalog" (`catalog_document`: the manifests of the models the broker serves and
the zoo's equivalence records, one JSON document; broker/planner/catalog.py reads it). The
broker reads at most `CHUNK_BYTES` per message from its zoo under the zoo's shared lock (gc
cannot remove a file mid-read) and never holds more than one chunk per request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

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


def catalog_document(models: Mapping[str, Any], zoo_dir: str | Path | None) -> bytes:
    """The planner's catalog as UTF-8 JSON: {"gen": N, "models": {name: manifest document},
    "equivalence": [record documents]} over the broker's models (ModelSpecs with a manifest)
    and its zoo's equivalence records."""
    docs = {
        name: json.loads(spec.manifest.to_json())
        for name, spec in sorted(models.items())
        if getattr(spec, "manifest", None) is not None
    }
    records: list[dict[str, Any]] = []
    if zoo_dir:
        from blockllm.zoo import Zoo

        zoo = Zoo(zoo_dir)
        with zoo.shared_lock():
            records = [r.to_dict() for r in zoo.equivalences()]
    return json.dumps({"models": docs, "equivalence": records}).encode()


def serve_fetch(
    zoo_dir: str | Path | None, msg: Fetch, catalog: Callable[[], bytes] | None = None
) -> tuple[Blob | Error, bytes | None]:
    """The answer to one FETCH: a BLOB and its chunk, or an ERROR (never raises).

    `what` = "catalog" (name "") is a chunk of `catalog()` (see catalog_document)."""
    if msg.what == "catalog" and catalog is not None:
        try:
            doc = catalog()
        except Exception as e:  # an unreadable equivalence record: say so, keep serving
            return Error(msg.request_id, ErrorCode.INTERNAL.value, f"catalog: {e}"), None
        if not 0 <= msg.offset <= len(doc):
            text = f"offset {msg.offset} outside 0..{len(doc)}"
            return Error(msg.request_id, ErrorCode.BAD_REQUEST.value, text), None
        length = CHUNK_BYTES if msg.length <= 0 else min(msg.length, CHUNK_BYTES)
        data = doc[msg.offset : msg.offset + length]
        meta = TensorMeta("uint8", (len(data),))
        return Blob(msg.request_id, msg.what, msg.name, msg.offset, len(doc), (meta,)), data
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
