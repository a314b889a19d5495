"""STATS bounded: a full snapshot now and then, and in between only what changed since it.

At 510 models on 64 workers one STATS body is ~480 kB, twice a second; at 2,000 models it
passes the protocol's 1 MiB header bound. Most of it does not change between snapshots: the
workers' stages, budgets and pins, the models' planned routes. So the broker publishes a full
STATS (as before: what an older planner reads) every `full_every` snapshots, and between two
of them a STATS_DELTA against the last full one: per worker
(by name) and per model, only the fields whose value differs from that full snapshot's, the
workers and models gone since, the order of the lists when it changed, and the top-level
summary (counters, requests, totals, time, `catalog_gen`). A delta is cumulative (against the
full snapshot, not the previous delta), so a subscriber that drops snapshots (the PUB socket
keeps only a few) loses nothing: the last full one and the newest delta give the current body.
A catalog change (a reload: an arriving tenant) travels in a delta too, its new models whole
and `catalog_gen` in the summary: a subscriber with the last full snapshot (the planner's
StatsView) has all it needs; one without it (just connected) and one that reads only full
STATS (a planner older than STATS_DELTA) get the next full one within `full_every` snapshots.

Bounded per message: a full body past `PART_BYTES` (at 2,000 models on 256 workers it is ~2 MB,
past the 1 MiB header bound) travels in several STATS parts of the same seq, each with a share
of the entries; a delta past `PART_BYTES` (cumulative deltas grow while the cluster churns) is
replaced by a new full snapshot.

The entries are typed (protocol WorkerStatus, ModelStats): a delta names the changed fields of
an entry by field name, with their wire values, and applying it validates them (frames
`from_fields`: ProtocolError for a malformed one) and yields typed entries again.
`DeltaPublisher` (the broker process) turns each body into encoded Stats or StatsDelta messages;
`StatsView` (the planner) turns what it receives back into full bodies: equal to the body the
broker built (tests/unit/test_stats_delta.py; tests/unit/test_stats_exact.py over a random
trace of the broker's state).

What it costs follows what changed, not the cluster: the broker keeps a model's entry (the
same object) while it does not change (broker/stats.py), an entry that is the base's object is
skipped, an entry's changed fields and their bytes are kept until the entry changes again,
and a header is assembled from kept per-entry bytes (broker/stats_wire.py): a full STATS packs
only the entries that changed since the last full one.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

from blockllm.broker import frames
from blockllm.broker.protocol import (
    ModelStats,
    ProtocolError,
    Stats,
    StatsBody,
    StatsDelta,
    WorkerStatus,
)
from blockllm.broker.stats_wire import (
    Packed,
    WireMemo,
    delta_header,
    pack,
    same,
    stats_header,
    wire,
)

FULL_EVERY = 10  # snapshots: a full one every 5 s at the default 0.5 s interval
PART_BYTES = 512 * 1024  # one STATS / STATS_DELTA header at most (the bound is 1 MiB)
Encoded = tuple["Stats | StatsDelta", list[Any]]  # a message and its frames
Entries = tuple[dict[str, WorkerStatus], dict[str, ModelStats]]
# per name: the entry, its fields that differ from the base's (wire values), their bytes
Changed = dict[str, tuple[Any, dict[str, Any], bytes]]
STEP_ENTRIES = 8  # entries encoded between two looks at the clock (Encoding.step)
Work = Generator[None, None, Any]  # encoding work: yields between entries, returns the result


def _entries(body: StatsBody) -> Entries:
    """Workers by name, models by name (the body's order)."""
    return {w.name: w for w in body.workers}, dict(body.models)


@functools.cache
def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _fields(
    entry: Any, old: Any = None, last: Any = None, convert: Callable[[Any], Any] = wire
) -> dict[str, Any]:
    """The fields of `entry` (those that differ from `old`'s when given), as on the wire.
    `last`: (an earlier entry of the same name, its fields against the same `old`): a field
    whose value is the same immutable object as that entry's (a route, a worker's stages:
    `stats_wire.same`) is taken from there, neither compared nor converted again."""
    out = {}
    prev, known = last if last is not None else (None, None)
    for k in _names(type(entry)):
        v = getattr(entry, k)
        if prev is not None and same(v, getattr(prev, k)):
            if k in known:
                out[k] = known[k]
        elif old is None or v != getattr(old, k):
            out[k] = convert(v)
    return out


class Encoding:
    """One snapshot's messages being encoded: `step(budget_s)` encodes entries until
    `budget_s` seconds (wall clock) have passed, and returns None while there is more to
    do, then the messages. The broker's loop calls it once per turn, routing in between, so
    no turn encodes for much longer than the budget (a full STATS at 2,020 models packs
    ~1 MB of changed entries: several turns). The snapshot's body is immutable (frozen
    entries, a body built per snapshot), so its encoding does not depend on when it is
    done: the messages are the same as `DeltaPublisher.publish`'s, byte for byte
    (tests/unit/test_stats_exact.py encodes the trace a few entries per step). A full
    snapshot in parts is assembled and sent at the end, all its parts in one turn; a
    subscriber applies one only with every part of its seq (StatsView.full)."""

    def __init__(self, work: Iterator[None], out: list[Encoded]) -> None:
        self._work = work
        self._out = out
        self.done = False
        self.steps = 0  # calls of step (tests, benches)

    def step(self, budget_s: float | None = None) -> list[Encoded] | None:
        """Encode for about `budget_s` seconds (None: to the end); the messages once done."""
        self.steps += 1
        if not self.done:
            if budget_s is None:
                for _ in self._work:
                    pass
            else:
                deadline = time.perf_counter() + budget_s
                for _ in self._work:
                    if time.perf_counter() >= deadline:
                        return None
            self.done = True
        return self._out


class DeltaPublisher:
    """Full STATS every `full_every` snapshots (or when a delta would pass `part_bytes`, or
    the last one came within an eighth of it), else STATS_DELTA against the last full one
    (module docstring; a catalog change too). The
    broker process's loop thread only. Kept bytes per entry: module docstring."""

    def __init__(self, full_every: int = FULL_EVERY, part_bytes: int = PART_BYTES) -> None:
        self.full_every = max(1, full_every)
        self.part_bytes = part_bytes
        self._base_seq = -1
        self._base: Entries = ({}, {})
        self._since = 0
        self._last_delta = 0  # the last delta's header bytes (0: a full one came since)
        self._memo = WireMemo()  # routes and planned routes by identity (stats_wire)
        memo = self._memo
        self._packed = (Packed(None, memo=memo), Packed(None, named=True, memo=memo))
        self._fields: tuple[Changed, Changed] = ({}, {})  # against the base, per name

    def start(self, seq: int, body: StatsBody) -> Encoding:
        """The messages (with their frames) that stand for `body`, encoded as `Encoding.step`
        is called (over several loop turns: Encoding). Nothing else may be started or
        published before this one is done."""
        out: list[Encoded] = []
        return Encoding(self._encode(seq, body, out), out)

    def publish(self, seq: int, body: StatsBody) -> list[Encoded]:
        """The messages (with their frames) that stand for `body`, encoded at once."""
        done = self.start(seq, body).step()
        assert done is not None
        return done

    def _encode(self, seq: int, body: StatsBody, out: list[Encoded]) -> Work:
        self._since += 1
        entries = _entries(body)
        # a cumulative delta within an eighth of the bound last time would likely pass it now:
        # a full one at once, not a delta built to be thrown away (both stand for the body)
        near = self._last_delta > self.part_bytes - self.part_bytes // 8
        if self._base_seq >= 0 and self._since < self.full_every and not near:
            delta, header = yield from self._delta(seq, body, entries)
            if len(header) <= self.part_bytes:
                self._last_delta = len(header)
                out.append((delta, [delta.KIND.value, header]))
                return
        self._base_seq, self._base, self._since = seq, entries, 0
        self._last_delta = 0
        self._fields = ({}, {})
        out.extend((yield from self._full(seq, body)))

    def _full(self, seq: int, body: StatsBody) -> Work:
        """One STATS, or parts of at most about `part_bytes` each when the body is larger.
        The entries are packed between yields; the parts are assembled at the end, all at
        once (from the packed bytes: a copy), so they go out together."""
        packed_w, packed_m = self._packed
        wb, mb = [], []
        for i, w in enumerate(body.workers, 1):
            wb.append(packed_w.get(w.name, w))
            if i % STEP_ENTRIES == 0:
                yield
        for i, (n, m) in enumerate(body.models.items(), 1):
            mb.append(packed_m.get(n, m))
            if i % STEP_ENTRIES == 0:
                yield
        packed_w.keep(w.name for w in body.workers)
        packed_m.keep(body.models)
        sizes = [len(b) for b in wb] + [len(b) for b in mb]
        msg = Stats(seq, body)
        if sum(sizes) <= self.part_bytes:  # (else the header is past the bound too)
            header = stats_header(msg, wb, mb)
            if len(header) <= self.part_bytes:
                return [(msg, [msg.KIND.value, header])]
        # the entries' share of a part: the bound less what part 0 carries besides them
        rest = Stats(seq, dataclasses.replace(body, workers=(), models={}), 1 << 16, 1 << 16)
        share = self.part_bytes - len(stats_header(rest, [], []))
        nw = len(wb)
        chunks: list[list[int]] = [[]]  # entry indices: the workers', then the models'
        used = 0
        for i, size in enumerate(sizes):
            if chunks[-1] and used + size > share:
                chunks.append([])
                used = 0
            chunks[-1].append(i)
            used += size
        names = list(body.models)
        out: list[Encoded] = []
        for k, chunk in enumerate(chunks):
            rest = body if k == 0 else StatsBody()
            ws = [i for i in chunk if i < nw]
            ms = [i - nw for i in chunk if i >= nw]
            part = dataclasses.replace(
                rest,
                workers=tuple(body.workers[i] for i in ws),
                models={names[i]: body.models[names[i]] for i in ms},
            )
            msg = Stats(seq, part, k, len(chunks))
            header = stats_header(msg, [wb[i] for i in ws], [mb[i] for i in ms])
            out.append((msg, [msg.KIND.value, header]))
        return out

    def message(self, seq: int, body: StatsBody) -> Stats | StatsDelta:
        """What `publish` sends when one message holds it (tests; small clusters)."""
        (msg, _), *more = self.publish(seq, body)
        assert not more, "a full snapshot in parts"
        return msg

    def _delta(self, seq: int, body: StatsBody, entries: Entries) -> Work:
        """(the delta, its header), the entries looked at between yields."""
        memo = self._memo.wire
        w_changed, w_whole, w_gone, w_order, wb = yield from _changes(
            self._base[0], entries[0], self._fields[0], memo
        )
        m_changed, m_whole, m_gone, m_order, mb = yield from _changes(
            self._base[1], entries[1], self._fields[1], memo
        )
        delta = StatsDelta(
            seq,
            self._base_seq,
            w_changed,
            w_whole,
            w_gone,
            w_order,
            m_changed,
            m_whole,
            m_gone,
            m_order,
            dataclasses.replace(body, workers=(), models={}),
        )
        return delta, delta_header(delta, wb, mb)


def _changes(
    base: dict[str, Any], now: dict[str, Any], known: Changed, convert: Callable[[Any], Any]
) -> Work:
    """(changed fields per name, names whose entry travels whole: the new ones, names gone,
    the order of the names when it is not the base's with the gone ones left out, the bytes
    of each changed name and its fields), returned after yielding every few entries.
    `known`: per name, the entry whose changed fields were last found and them with their
    bytes (updated at the end: only the names in `now` stay)."""
    changed: dict[str, dict[str, Any]] = {}
    whole: list[str] = []
    data: list[bytes] = []
    seen: Changed = {}
    for i, (name, entry) in enumerate(now.items(), 1):
        if i % STEP_ENTRIES == 0:
            yield
        old = base.get(name)
        if old is entry:
            continue
        hit = known.get(name)
        if hit is not None and hit[0] is entry:
            seen[name] = hit
        else:
            fields = _fields(entry, old, hit[:2] if hit is not None else None, convert)
            hit = seen[name] = (entry, fields, pack(name) + pack(fields))
        if old is None:
            whole.append(name)
        if hit[1]:
            changed[name] = hit[1]
            data.append(hit[2])
    known.clear()
    known.update(seen)
    gone = tuple(n for n in base if n not in now) if len(base) + len(whole) != len(now) else ()
    merged = [n for n in base if n in now] + whole if gone else list(base) + whole
    order = () if merged == list(now) else tuple(now)
    return changed, tuple(whole), gone, order, data


class StatsView:
    """The planner's side: the last full STATS body and the deltas applied to it."""

    def __init__(self) -> None:
        self.base_seq = -1
        self._base: Entries = ({}, {})
        self.skipped = 0  # deltas against a full snapshot this view never got
        self._parts_seq = -1  # the full snapshot whose parts are coming in
        self._parts: dict[int, StatsBody] = {}

    def full(self, msg: Stats) -> StatsBody | None:
        """The body of a full STATS: at once, or with its last part (None before)."""
        if msg.parts <= 1:
            body = msg.body
        else:
            if msg.seq != self._parts_seq:
                self._parts_seq, self._parts = msg.seq, {}
            self._parts[msg.part] = msg.body
            if len(self._parts) < msg.parts:
                return None
            parts = [self._parts.get(i, StatsBody()) for i in range(msg.parts)]
            body = dataclasses.replace(
                parts[0],
                workers=tuple(w for p in parts for w in p.workers),
                models={n: m for p in parts for n, m in p.models.items()},
            )
            self._parts_seq, self._parts = -1, {}
        self.base_seq, self._base = msg.seq, _entries(body)
        return body

    def apply(self, msg: StatsDelta) -> StatsBody | None:
        """The body `msg` stands for; None when its full snapshot was never received (the
        next full one comes within `full_every` snapshots). ProtocolError for a malformed
        entry (or an order naming an entry it does not have)."""
        if msg.base != self.base_seq:
            self.skipped += 1
            return None
        workers = _merge(
            WorkerStatus, self._base[0], msg.workers, msg.whole_workers, msg.gone_workers
        )
        models = _merge(ModelStats, self._base[1], msg.models, msg.whole_models, msg.gone_models)
        try:
            return dataclasses.replace(
                msg.summary,
                workers=tuple(workers[n] for n in msg.worker_order or workers),
                models={n: models[n] for n in msg.model_order or models},
            )
        except KeyError as e:
            raise ProtocolError(f"STATS_DELTA: the order names {e} it does not have") from None


def _merge(
    cls: type,
    base: dict[str, Any],
    changed: dict[str, dict[str, Any]],
    whole: tuple[str, ...],
    gone: tuple[str, ...],
) -> dict[str, Any]:
    """The entries by name: the base's (those not gone) with the changed fields applied, then
    the new ones."""
    dropped = set(gone)
    fresh = set(whole)
    out = {}
    for name, entry in base.items():
        if name in dropped:
            continue
        fields = changed.get(name)
        if fields is None:
            out[name] = entry
        else:
            out[name] = frames.from_fields(cls, fields, None if name in fresh else entry)
    for name in whole:
        if name not in base:
            if name not in changed:
                raise ProtocolError(f"STATS_DELTA: no fields for the new entry {name!r}")
            out[name] = frames.from_fields(cls, changed[name])
    return out
