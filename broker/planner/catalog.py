"""Where the planner learns the models it places: the broker's catalog, over the protocol.

The broker already holds the manifests of the models it serves and reads its zoo's equivalence
records; the planner asks for both as one JSON document (FETCH "catalog", chunked like any zoo
object, broker/fetch.py `catalog_document`) on a DEALER of its own, every wait bounded. So a
planner needs only `--broker` (and `--keys`): no zoo on its node. STATS carries `catalog_gen`,
which changes on every reload of the broker's models; the Planner asks again when it changes.

`zoo_catalog(dir)` reads a local zoo instead (tests, tools that have one).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import zmq

from blockllm.broker import frames
from blockllm.broker.protocol import Blob, Error, Fetch, ProtocolError
from blockllm.broker.sockets import make_socket

logger = logging.getLogger(__name__)

Catalog = tuple[Mapping[str, Any], list[Any]]  # (manifests by name, equivalence records)


class CatalogUnavailable(RuntimeError):
    """The broker gave no catalog (no answer in time, an error, a bad document)."""


def zoo_catalog(zoo_dir: str | None) -> Any:
    """A Planner catalog: () -> (manifests by name, equivalence records) of a local zoo."""

    def read() -> Catalog:
        if not zoo_dir:
            return {}, []
        from blockllm.zoo import Zoo

        zoo = Zoo(zoo_dir)
        manifests = {}
        for name in zoo.list_models():
            with contextlib.suppress(Exception):  # one unreadable model must not hide the rest
                manifests[name] = zoo.manifest(name)
        return manifests, zoo.equivalences()

    return read


def parse_catalog(data: bytes) -> Catalog:
    """The broker's catalog document -> (manifests, equivalence records); CatalogUnavailable
    when it is not one."""
    from blockllm.zoo.equiv_store import EquivalenceRecord
    from blockllm.zoo.manifest import ModelManifest

    try:
        doc = json.loads(data)
        manifests = {
            name: ModelManifest.from_json(json.dumps(m), where=f"broker manifest {name}")
            for name, m in doc["models"].items()
        }
        records = [EquivalenceRecord.from_dict(r) for r in doc["equivalence"]]
    except Exception as e:  # JSON, KeyError, IntegrityError, TypeError: all one answer
        raise CatalogUnavailable(f"bad catalog from the broker: {e}") from None
    return manifests, records


class BrokerCatalog:
    """A Planner catalog read from the broker (module docstring). Call from one thread only
    (the planner's loop); `close()` from that thread too. Raises CatalogUnavailable."""

    def __init__(
        self, ctx: zmq.Context, broker: str, curve: Any = None, timeout_s: float = 5.0
    ) -> None:
        self.ctx = ctx
        self.broker = broker
        self.curve = curve
        self.timeout_s = timeout_s
        self.sock: zmq.Socket | None = None
        self._ids = itertools.count(1)

    def _socket(self) -> zmq.Socket:
        if self.sock is None:
            identity = f"planner-{os.getpid()}-catalog".encode()
            self.sock = make_socket(
                self.ctx, zmq.DEALER, self.broker, bind=False, identity=identity, curve=self.curve
            )
        return self.sock

    def _reset(self) -> None:
        """Drop the socket (a later call connects anew): no stale answer can be misread."""
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def close(self) -> None:
        self._reset()

    def __call__(self) -> Catalog:
        try:
            return parse_catalog(self.fetch("catalog", ""))
        except CatalogUnavailable:
            self._reset()
            raise

    def fetch(self, what: str, name: str) -> bytes:
        """One whole object, chunk by chunk, within `timeout_s` in all."""
        sock = self._socket()
        deadline = time.monotonic() + self.timeout_s
        data = bytearray()
        total: int | None = None
        while total is None or len(data) < total:
            rid = f"catalog-{next(self._ids)}"
            try:  # NOBLOCK: with no connection (a refused key) a send would wait forever
                sock.send_multipart(frames.encode(Fetch(rid, what, name, len(data))), zmq.NOBLOCK)
            except zmq.Again:
                raise CatalogUnavailable(f"no connection to the broker at {self.broker}") from None
            blob, chunk = self._answer(sock, rid, deadline)
            if blob.offset != len(data) or (not chunk and len(data) < blob.total):
                raise CatalogUnavailable(f"bad chunk of the catalog at {len(data)}")
            if total is not None and blob.total != total:  # a reload meanwhile: start again
                data, total = bytearray(), None
                continue
            data += chunk
            total = blob.total
        return bytes(data)

    def _answer(self, sock: zmq.Socket, rid: str, deadline: float) -> tuple[Blob, bytes]:
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                break
            parts = sock.recv_multipart()
            try:
                msg = frames.decode_header(parts)
            except ProtocolError as e:
                raise CatalogUnavailable(f"bad answer from the broker: {e}") from None
            tensors = parts[2:]
            if getattr(msg, "request_id", None) != rid:
                continue  # an answer to an earlier, timed-out question
            if isinstance(msg, Error):
                raise CatalogUnavailable(f"the broker refused: {msg.code} {msg.message}")
            if isinstance(msg, Blob) and len(tensors) == 1:
                chunk = bytes(tensors[0])
                if len(chunk) == frames.tensor_nbytes(msg.tensors[0]):
                    return msg, chunk
            raise CatalogUnavailable(f"unexpected answer {type(msg).__name__} to FETCH")
        raise CatalogUnavailable(
            f"no catalog from the broker at {self.broker} within {self.timeout_s:g} s"
        )
