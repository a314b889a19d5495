"""STATS bounded: a full snapshot now and then, and in between only what changed since it.

At 510 models on 64 workers one STATS body is ~480 kB, twice a second; at 2,000 models it
passes the protocol's 1 MiB header bound. Most of it does not change between snapshots: the
workers' stages, budgets and pins, the models' planned routes. So the broker publishes a full
STATS (as before: what an older planner reads) every `full_every` snapshots (and when the
catalog changed), and between two of them a STATS_DELTA against the last full one: per worker
(by name) and per model, only the fields whose value differs from that full snapshot's, the
workers and models gone since, the order of the lists when it changed, and the top-level
summary (counters, requests, totals, time). A delta is cumulative (against the full snapshot,
not the previous delta), so a subscriber that drops snapshots (the PUB socket keeps only a few)
loses nothing: the last full one and the newest delta give the current body.

Bounded per message: a full body past `PART_BYTES` (at 2,000 models on 256 workers it is ~2 MB,
past the 1 MiB header bound) travels in several STATS parts of the same seq, each with a share
of the entries; a delta past `PART_BYTES` (cumulative deltas grow while the cluster churns) is
replaced by a new full snapshot.

`DeltaPublisher` (the broker process) turns each body into encoded Stats or StatsDelta messages;
`StatsView` (the planner) turns what it receives back into full bodies: equal to the body the
broker built (tests/unit/test_stats_delta.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack

from blockllm.broker import frames
from blockllm.broker.protocol import Stats, StatsDelta

FULL_EVERY = 10  # snapshots: a full one every 5 s at the default 0.5 s interval
PART_BYTES = 512 * 1024  # one STATS / STATS_DELTA header at most (the bound is 1 MiB)
Encoded = tuple["Stats | StatsDelta", list[Any]]  # a message and its frames
LISTS = ("workers", "models")  # the per-entry parts; everything else is the summary


def _entries(body: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Workers by name, models by name (the body's order)."""
    return {w["name"]: w for w in body.get("workers", ())}, dict(body.get("models", {}))


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any] | None:
    """The fields of `new` whose value differs from `old`'s; None when a field went (the
    entry travels whole then)."""
    if old.keys() - new.keys():
        return None
    return {k: v for k, v in new.items() if k not in old or old[k] != v}


class DeltaPublisher:
    """Full STATS every `full_every` snapshots (or when `catalog_gen` moved, or a delta would
    pass `part_bytes`), else STATS_DELTA against the last full one (module docstring). The
    broker process's loop thread only."""

    def __init__(self, full_every: int = FULL_EVERY, part_bytes: int = PART_BYTES) -> None:
        self.full_every = max(1, full_every)
        self.part_bytes = part_bytes
        self._base_seq = -1
        self._base: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
        self._since = 0
        self._catalog: Any = None

    def publish(self, seq: int, body: dict[str, Any]) -> list[Encoded]:
        """The messages (with their frames) that stand for `body`."""
        self._since += 1
        catalog = body.get("catalog_gen")
        if self._base_seq >= 0 and self._since < self.full_every and catalog == self._catalog:
            delta = self._delta(seq, body)
            wire = frames.encode(delta)
            if len(wire[1]) <= self.part_bytes:
                return [(delta, wire)]
        self._base_seq, self._base, self._since = seq, _entries(body), 0
        self._catalog = catalog
        return [(m, frames.encode(m)) for m in self._full(seq, body)]

    def _full(self, seq: int, body: dict[str, Any]) -> list[Stats]:
        """One STATS, or parts of at most about `part_bytes` each when the body is larger."""
        sizes = [len(msgpack.packb(w, default=str)) for w in body.get("workers", ())]
        models = body.get("models", {})
        sizes += [len(msgpack.packb(m, default=str)) + len(n) for n, m in models.items()]
        if sum(sizes) <= self.part_bytes:
            return [Stats(seq, body)]
        entries = [("w", w) for w in body.get("workers", ())]
        entries += [("m", (n, m)) for n, m in models.items()]
        chunks: list[list[tuple[str, Any]]] = [[]]
        used = 0
        for entry, size in zip(entries, sizes, strict=True):
            if chunks[-1] and used + size > self.part_bytes:
                chunks.append([])
                used = 0
            chunks[-1].append(entry)
            used += size
        rest = {k: v for k, v in body.items() if k not in LISTS}
        out = []
        for i, chunk in enumerate(chunks):
            part = dict(rest) if i == 0 else {}
            part["workers"] = [e for kind, e in chunk if kind == "w"]
            part["models"] = {n: m for kind, (n, m) in ((k, e) for k, e in chunk if k == "m")}
            out.append(Stats(seq, part, i, len(chunks)))
        return out

    def message(self, seq: int, body: dict[str, Any]) -> Stats | StatsDelta:
        """What `publish` sends when one message holds it (tests; small clusters)."""
        (msg, _), *more = self.publish(seq, body)
        assert not more, "a full snapshot in parts"
        return msg

    def _delta(self, seq: int, body: dict[str, Any]) -> StatsDelta:
        workers, models = _entries(body)
        return StatsDelta(
            seq,
            self._base_seq,
            *self._changes(self._base[0], workers),
            *self._changes(self._base[1], models),
            {k: v for k, v in body.items() if k not in LISTS},
        )

    @staticmethod
    def _changes(
        base: dict[str, Any], now: dict[str, Any]
    ) -> tuple[dict[str, Any], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """(changed fields per name, names whose entry travels whole, names gone, the order
        of the names when it is not the base's with the gone ones left out)."""
        changed: dict[str, Any] = {}
        whole: list[str] = []
        for name, entry in now.items():
            old = base.get(name)
            fields = None if old is None else _diff(old, entry)
            if fields is None:
                changed[name] = entry
                whole.append(name)
            elif fields:
                changed[name] = fields
        gone = tuple(n for n in base if n not in now)
        merged = [n for n in base if n in now] + [n for n in now if n not in base]
        order = () if merged == list(now) else tuple(now)
        return changed, tuple(whole), gone, order


class StatsView:
    """The planner's side: the last full STATS body and the deltas applied to it."""

    def __init__(self) -> None:
        self.base_seq = -1
        self._base: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
        self.skipped = 0  # deltas against a full snapshot this view never got
        self._parts_seq = -1  # the full snapshot whose parts are coming in
        self._parts: dict[int, dict[str, Any]] = {}

    def full(self, msg: Stats) -> dict[str, Any] | None:
        """The body of a full STATS: at once, or with its last part (None before)."""
        if msg.parts <= 1:
            body = msg.body
        else:
            if msg.seq != self._parts_seq:
                self._parts_seq, self._parts = msg.seq, {}
            self._parts[msg.part] = msg.body
            if len(self._parts) < msg.parts:
                return None
            body = dict(self._parts.get(0, {}))
            body["workers"] = [w for i in range(msg.parts) for w in self._parts[i]["workers"]]
            body["models"] = {
                n: m for i in range(msg.parts) for n, m in self._parts[i]["models"].items()
            }
            self._parts_seq, self._parts = -1, {}
        self.base_seq, self._base = msg.seq, _entries(body)
        return body

    def apply(self, msg: StatsDelta) -> dict[str, Any] | None:
        """The body `msg` stands for; None when its full snapshot was never received (the
        next full one comes within `full_every` snapshots)."""
        if msg.base != self.base_seq:
            self.skipped += 1
            return None
        workers = _merge(self._base[0], msg.workers, msg.whole_workers, msg.gone_workers)
        models = _merge(self._base[1], msg.models, msg.whole_models, msg.gone_models)
        body = dict(msg.summary)
        body["workers"] = [workers[n] for n in msg.worker_order or workers]
        body["models"] = {n: models[n] for n in msg.model_order or models}
        return body


def _merge(
    base: dict[str, Any],
    changed: Mapping[str, Any],
    whole: tuple[str, ...],
    gone: tuple[str, ...],
) -> dict[str, Any]:
    """The entries by name: the base's (those not gone) with the changed fields applied, then
    the new ones."""
    dropped = set(gone)
    out = {}
    for name, entry in base.items():
        if name in dropped:
            continue
        fields = changed.get(name)
        out[name] = entry if fields is None else (fields if name in whole else entry | fields)
    for name in whole:
        if name not in base:
            out[name] = changed[name]
    return out
