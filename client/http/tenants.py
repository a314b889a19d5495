"""The models the HTTP API serves, as the broker knows them (one event loop; no threads but
the one-off tokenizer loads).

- `refresh()` (a task in the app's lifespan, every `status_interval_s`): the broker's STATUS:
  which models exist and are covered; `/health`, `/v1/models` and each request read it.
- `tokenizer(model)`: the tenant's tokenizer files fetched from the broker's zoo (FETCH, the
  same channel workers use) into a private folder, loaded once with `AutoTokenizer` (in a
  thread, once per tokenizer). So `blockllm http` needs only the broker's address and keys.
- `parents()`: each model's `parent` for `/v1/models`: the model of its family it shares most
  blocks with, if that one is more central (shares more with all the others; ties: imported
  first, then the name sorting first), so a base has none and each fine-tune names its base.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockllm.client.errors import BlockLLMError
from blockllm.client.http.errors import ApiError, bad_request, model_not_found, unavailable

logger = logging.getLogger(__name__)

STALE_AFTER = 3  # status intervals without an answer: the broker counts as unreachable


class BrokerNotAnswering(Exception):
    """The broker gave no STATUS before the HTTP API's ready timeout (it never becomes ready)."""


class Tenants:
    """Status, manifests and tokenizers of the broker's models (the app's event loop only)."""

    def __init__(self, client: Any, status_interval_s: float = 1.0) -> None:
        self.client = client
        self.interval = status_interval_s
        self.status: dict[str, Any] = {}
        self.status_at = 0.0  # monotonic time of the last answer (0: none yet)
        self.status_error = "no answer from the broker yet"
        self._manifests: dict[str, dict[str, Any]] = {}
        self._tokenizers: dict[str, asyncio.Future[Any]] = {}  # tokenizer id -> its load
        self._dir = Path(tempfile.mkdtemp(prefix="blockllm-http-"))
        self._parents: dict[str, str | None] | None = None
        self._warming: set[asyncio.Future[None]] = set()

    def close(self) -> None:
        for task in [*self._warming, *self._tokenizers.values()]:
            task.cancel()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- status ------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """One STATUS round trip; the error is remembered, never raised."""
        try:
            body = await self.client.status(timeout=max(2.0, 2 * self.interval))
        except BlockLLMError as e:
            self.status_error = e.message
            return
        if set(body.get("models", {})) != set(self.models()):
            self._manifests.clear()  # models came or went: re-read what they are
            self._parents = None
        self.status, self.status_at = body, time.monotonic()

    async def first_status(
        self, broker: str, timeout: float, stop: Callable[[], bool] = lambda: False
    ) -> None:
        """Wait, bounded, for the broker's first STATUS (the HTTP API is ready only with it, so
        its first request is not refused "broker unreachable"); BrokerNotAnswering if none.
        Returns early, without it, once `stop()` (a signal came)."""
        deadline = time.monotonic() + timeout
        told = False
        while not stop():
            await self.refresh()
            if self.status_at:
                if told:
                    logger.info("[ready] the broker at %s answered", broker)
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerNotAnswering(
                    f"the broker at {broker} did not answer STATUS within {timeout:g} s "
                    f"({self.status_error}): is it running, is --broker (or [broker] public) its "
                    "address, and are --keys admitted by it?"
                )
            if not told:
                told = True
                logger.warning(
                    "[wait] no answer from the broker at %s yet (%s); waiting up to %g s",
                    broker,
                    self.status_error,
                    timeout,
                )
            await asyncio.sleep(min(self.interval, left))  # a refused handshake fails at once

    async def run(self) -> None:
        """The status task; it also loads each new model's tokenizer ahead of its first
        request (a load takes a fetch and a second or so)."""
        warmed: set[str] = set()
        while True:
            await self.refresh()
            for model in set(self.models()) - warmed:
                warmed.add(model)
                task = asyncio.ensure_future(self._warm(model))
                self._warming.add(task)
                task.add_done_callback(self._warming.discard)
            await asyncio.sleep(self.interval)

    async def _warm(self, model: str) -> None:
        with contextlib.suppress(Exception):  # a model without one, or a failed fetch: later
            await self.tokenizer(model)

    @property
    def reachable(self) -> bool:
        return bool(self.status_at) and (
            time.monotonic() - self.status_at <= STALE_AFTER * self.interval + 2.0
        )

    def models(self) -> dict[str, dict[str, Any]]:
        models = self.status.get("models")
        return models if isinstance(models, dict) else {}

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, body): the broker answers and every model is covered."""
        models = self.models()
        uncovered = sorted(m for m, v in models.items() if not v.get("covered"))
        ok = self.reachable and bool(models) and not uncovered
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "broker": self.reachable}
        body["models"] = len(models)
        if uncovered:
            body["uncovered"] = uncovered
        if not self.reachable:
            body["error"] = self.status_error
        return ok, body

    def check(self, model: str, allowed: bool) -> None:
        """404 for an unknown (or forbidden) model, 503 when it cannot be served now."""
        if not self.reachable:
            raise unavailable(f"broker unreachable: {self.status_error}")
        entry = self.models().get(model)
        if entry is None or not allowed:
            raise model_not_found(model)
        if not entry.get("covered"):
            raise unavailable(f"model {model!r} is not served by any worker right now")

    async def check_fresh(self, model: str, allowed: bool) -> None:
        """`check`, but a 503 only from a fresh STATUS: the view is refreshed every
        `interval` (and later on a loaded machine), so a model that has just become covered
        (or a broker that answers again) would be refused on an old view. One more STATUS
        round trip before refusing; the fast path (a covered model) asks nothing."""
        try:
            self.check(model, allowed)
        except ApiError as e:
            if e.status != 503:
                raise
            await self.refresh()
            self.check(model, allowed)

    # -- manifests, parents, tokenizers ------------------------------------------------------
    async def manifest(self, model: str) -> dict[str, Any]:
        if model not in self._manifests:
            import json

            raw = await self.client.fetch("manifest", model)
            self._manifests[model] = json.loads(raw)
        return self._manifests[model]

    async def parents(self) -> dict[str, str | None]:
        if self._parents is None:
            manifests = {}
            names = list(self.models())
            for i in range(0, len(names), 64):  # 64 fetches in flight, not 2,000 one by one
                got = await asyncio.gather(
                    *(self.manifest(m) for m in names[i : i + 64]), return_exceptions=True
                )
                for m, doc in zip(names[i : i + 64], got, strict=True):
                    if isinstance(doc, BlockLLMError):
                        logger.warning(
                            "[models] cannot read the manifest of %s: %s", m, doc.message
                        )
                    elif isinstance(doc, BaseException):
                        raise doc
                    else:
                        manifests[m] = doc
            # off the event loop: streams go on meanwhile
            self._parents = await asyncio.to_thread(parents_of, manifests)
        return self._parents

    async def created(self, model: str) -> int:
        try:
            stamp = (await self.manifest(model)).get("source", {}).get("imported_at", "")
            return int(dt.datetime.fromisoformat(stamp).timestamp())
        except (BlockLLMError, ValueError, TypeError, AttributeError):
            return 0

    async def tokenizer(self, model: str) -> Any:
        """The model's HF tokenizer (fetched and loaded once); 400 when it has none."""
        digest = (await self.manifest(model)).get("tokenizer")
        if not digest:
            raise bad_request(f"model {model!r} has no tokenizer in the zoo: send token ids")
        task = self._tokenizers.get(digest)
        if task is None:  # one load per tokenizer, whoever asks first; a failed one is retried
            task = asyncio.ensure_future(self._load_tokenizer(digest))
            self._tokenizers[digest] = task
            task.add_done_callback(lambda t: self._forget_failed(digest, t))
        return await asyncio.shield(task)  # a caller that goes away does not cancel the load

    def _forget_failed(self, digest: str, task: asyncio.Future[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            self._tokenizers.pop(digest, None)

    async def _load_tokenizer(self, digest: str) -> Any:
        from blockllm.zoo.store import TOKENIZER_FILES

        folder = self._dir / digest
        folder.mkdir(exist_ok=True)
        for fname in TOKENIZER_FILES:
            try:
                data = await self.client.fetch("tokenizer", f"{digest}/{fname}")
            except BlockLLMError as e:
                if e.code == "BAD_REQUEST":  # the zoo's tokenizer has no such file
                    continue
                raise
            (folder / fname).write_bytes(data)
        return await asyncio.to_thread(_load_hf_tokenizer, folder)


# One tokenizer load at a time: transformers' lazy module is not thread-safe on first use (two
# threads importing it at once can see "cannot import name 'AutoTokenizer'").
_HF_LOCK = threading.Lock()


def _load_hf_tokenizer(folder: Path) -> Any:
    with _HF_LOCK:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)


EXACT_FAMILY = 256  # families up to this size: every pair of models is compared
CENTRAL_CANDIDATES = 32  # larger ones: these most central models, and those sharing a rarer block


def parents_of(manifests: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    """model -> the model it shares most blocks with among more central ones, or None.

    Centrality is counted per block (how many other models of the family hold it), so it is
    linear in the blocks. The parent search compares every pair in a family of up to
    EXACT_FAMILY models; in a larger one (thousands of fine-tunes of one base: all pairs took
    6 CPU-s at 2,001 on the HTTP API's event loop) a model's candidates are the family's
    CENTRAL_CANDIDATES most central models and the models sharing one of its blocks that at
    most half the family holds (a fine-tune of a fine-tune finds the one it was made from)."""
    chains = {m: set(doc.get("chain", ())) for m, doc in manifests.items()}
    family = {m: doc.get("fingerprint") or m for m, doc in manifests.items()}
    imported = {m: str(d.get("source", {}).get("imported_at", "")) for m, d in manifests.items()}
    members: dict[str, list[str]] = {}
    for m in chains:
        members.setdefault(family[m], []).append(m)
    holders: dict[tuple[str, str], list[str]] = {}
    for m, chain in chains.items():
        for b in chain:
            holders.setdefault((family[m], b), []).append(m)
    central = {m: sum(len(holders[family[m], b]) - 1 for b in chains[m]) for m in chains}
    # ties: imported earlier, then the name sorting first (a fine-tune's name usually extends
    # its base's: smollm2 < smollm2-chat)
    rank = {m: (central[m], _earlier(imported[m]), _earlier(m)) for m in chains}
    top = {
        f: sorted(ms, key=rank.__getitem__, reverse=True)[:CENTRAL_CANDIDATES]
        for f, ms in members.items()
    }

    def candidates(m: str) -> list[str] | set[str]:
        group = members[family[m]]
        if len(group) <= EXACT_FAMILY:
            return group
        rare = (holders[family[m], b] for b in chains[m])
        return {*top[family[m]], *(o for h in rare if 2 * len(h) <= len(group) for o in h)}

    out: dict[str, str | None] = {}
    for m in chains:
        shared = {o: len(chains[m] & chains[o]) for o in candidates(m) if o != m}
        above = [o for o, n in shared.items() if n > 0 and rank[o] > rank[m]]
        declared = manifests[m].get("source", {}).get("base")
        if isinstance(declared, str) and declared in chains and declared != m:
            out[m] = declared  # an adapter imported with its base named
        else:
            out[m] = max(above, key=lambda o: (shared[o], rank[o]), default=None)
    return out


def _earlier(stamp: str) -> str:
    """A sort key where an earlier string (import time, name) ranks higher; "" lowest."""
    # each character inverted, and a top sentinel so that a prefix ranks above its extensions
    return "".join(chr(0x10FFFE - ord(c)) for c in stamp) + chr(0x10FFFF) if stamp else ""
