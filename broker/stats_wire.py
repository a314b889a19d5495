"""STATS and STATS_DELTA headers assembled from per-entry encodings, byte for byte what
`frames.encode` packs (tests/unit/test_stats_exact.py compares them).

A STATS header is a msgpack array `[seq, body, part, parts]` whose body's first two fields are
the workers' list and the models' map; a STATS_DELTA header carries per worker / model name a
map of its changed fields. Most entries are the same objects from one snapshot to the next
(broker/stats.py keeps an unchanged model's entry), so their packed bytes are kept per name
(`Packed`) and a header is the array and map heads (msgpack's shortest forms, as `packb`
writes them) joined with those bytes: encoding costs the entries that changed, not the
cluster.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from blockllm.broker import frames
from blockllm.broker.protocol import Stats, StatsBody, StatsDelta

_BODY = tuple(f.name for f in dataclasses.fields(StatsBody))
_DELTA = tuple(f.name for f in dataclasses.fields(StatsDelta))
assert _BODY[:2] == ("workers", "models"), "STATS: the lists first"
assert tuple(f.name for f in dataclasses.fields(Stats)) == ("seq", "body", "part", "parts")
assert _DELTA[:2] == ("seq", "base") and _DELTA[2] == "workers" and _DELTA[6] == "models"
assert _DELTA[-1] == "summary" and len(_DELTA) == 11


def pack(value: Any) -> bytes:
    """`value` (already wire-shaped: plain values, lists, dicts) as frames.encode packs it."""
    return msgpack.packb(value, use_bin_type=True)


def array_head(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def map_head(n: int) -> bytes:
    if n < 16:
        return bytes((0x80 | n,))
    if n < 1 << 16:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


class Packed:
    """Per name: the entry last packed and its bytes (`fn(name, entry)`), reused while the
    entry is the same object (entries are frozen; a changed one is a new object). With
    `named=True` an entry is packed field by field (`name`, then an array of its fields), and
    a field whose value is the same immutable object as the previous entry's (a route, a
    worker's stages) keeps its bytes: a new entry costs its changed fields."""

    def __init__(
        self, fn: Callable[[str, Any], bytes] | None, named: bool = False, memo: Any = None
    ) -> None:
        self._fn = fn
        self._named = named
        self._convert = wire if memo is None else memo.wire
        # name -> (entry, its bytes, its field values, their bytes)
        self._by_name: dict[str, tuple[Any, bytes, Any, list[bytes]]] = {}
        self.packed = 0  # entries packed (tests, benches)

    def get(self, name: str, entry: Any) -> bytes:
        cached = self._by_name.get(name)
        if cached is not None and cached[0] is entry:
            return cached[1]
        if self._fn is not None and not self._named:
            data, values, parts = self._fn(name, entry), None, []
        else:
            values = fields_of(entry)
            old = cached[2] if cached is not None else None
            parts = field_bytes(values, old, None if old is None else cached[3], self._convert)
            data = b"".join((pack(name) if self._named else b"", array_head(len(parts)), *parts))
        self._by_name[name] = (entry, data, values, parts)
        self.packed += 1
        return data

    def keep(self, names: Iterable[str]) -> None:
        """Forget the names not in `names` (the entries gone)."""
        names = set(names)
        if len(names) < len(self._by_name):
            self._by_name = {n: v for n, v in self._by_name.items() if n in names}

    def clear(self) -> None:
        self._by_name.clear()


_PLAIN = frozenset({str, int, float, bool, bytes, type(None)})
_GETTERS: dict[type, Callable[[Any], tuple[Any, ...]]] = {}


def wire(value: Any) -> Any:
    """frames.to_wire's value (dataclasses as arrays of their fields, tuples as lists, enums
    as their values), its fields read with one attrgetter per dataclass."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is tuple or kind is list:  # (before the dataclass check: the most common)
        return [v if type(v) in _PLAIN else wire(v) for v in value]
    get = _GETTERS.get(kind)
    if get is None and dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [f.name for f in dataclasses.fields(value)]
        if len(names) > 1:
            get = _GETTERS[kind] = operator.attrgetter(*names)
        else:  # attrgetter of one name gives the value, of none fails
            get = _GETTERS[kind] = lambda v, names=names: tuple(getattr(v, n) for n in names)
    if get is not None:
        return [v if type(v) in _PLAIN else wire(v) for v in get(value)]
    if kind is tuple or kind is list or isinstance(value, (tuple, list)):
        return [v if type(v) in _PLAIN else wire(v) for v in value]
    if isinstance(value, dict):
        return {k: v if type(v) in _PLAIN else wire(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


def fields_of(entry: Any) -> tuple[Any, ...]:
    """A dataclass entry's field values in order (one attrgetter per class)."""
    kind = type(entry)
    get = _GETTERS.get(kind)
    if get is None:
        wire(entry)  # (makes the getter)
        get = _GETTERS[kind]
    return get(entry)


_IMMUTABLE = _PLAIN | {tuple, frozenset}


def same(value: Any, old: Any) -> bool:
    """Whether `value` is `old`, an immutable object (a tuple of frozen entries, a number):
    then what was computed from `old` holds for it."""
    return value is old and type(value) in _IMMUTABLE


def field_bytes(
    values: Any, old: Any, old_bytes: list[bytes] | None, convert: Callable[[Any], Any] = wire
) -> list[bytes]:
    """The packed wire value of each of `values` (`convert`: `wire` or a WireMemo's), those
    that are `same` as `old`'s (the previous entry's values, packed as `old_bytes`) taken
    from there."""
    if old is None or old_bytes is None:
        return [pack(v if type(v) in _PLAIN else convert(v)) for v in values]
    return [
        old_bytes[i] if same(v, old[i]) else pack(v if type(v) in _PLAIN else convert(v))
        for i, v in enumerate(values)
    ]


class WireMemo:
    """`wire` of tuples by identity (a route, a model's planned routes: shared by the entries
    of many snapshots while they do not change), each object kept with its wire value so
    that its id is not reused. Two generations of at most `limit` objects each: a value
    asked for again moves to the newest, the older generation is dropped when the newest
    fills, so what it holds stays near what the snapshots use; and its wire values are
    tuples (`frozen`), which msgpack packs as it packs lists and the garbage collector stops
    tracking (tuples of numbers and strings). (A single table of lists forgotten only past
    65k objects held ~250k lists at 2,020 models: 60% of the objects a full garbage
    collection of the simulated broker's process walked, ~300 ms each.) The values it
    returns are shared: nothing may change them (msgpack only reads them; a subscriber gets
    them through the codec, as lists)."""

    def __init__(self, limit: int = 1 << 12) -> None:
        self.limit = limit
        self._by_id: dict[int, tuple[Any, Any]] = {}  # the newest generation
        self._old: dict[int, tuple[Any, Any]] = {}

    def wire(self, value: Any) -> Any:
        if type(value) is not tuple:
            return wire(value)
        key = id(value)
        hit = self._by_id.get(key)
        if hit is not None and hit[0] is value:
            return hit[1]
        hit = self._old.get(key)
        if hit is None or hit[0] is not value:
            hit = (value, frozen(wire(value)))
        if len(self._by_id) >= self.limit:
            self._old, self._by_id = self._by_id, {}
        self._by_id[key] = hit
        return hit[1]

    def __len__(self) -> int:
        return len(self._by_id) + len(self._old)


def frozen(value: Any) -> Any:
    """A wire value with its lists as tuples (packed the same)."""
    kind = type(value)
    if kind is list:
        return tuple([v if type(v) in _PLAIN else frozen(v) for v in value])
    if kind is dict:
        return {k: v if type(v) in _PLAIN else frozen(v) for k, v in value.items()}
    return value


def worker_bytes(name: str, entry: Any) -> bytes:
    return pack(wire(entry))


def model_bytes(name: str, entry: Any) -> bytes:
    """A models map item: the name, then the entry."""
    return pack(name) + pack(wire(entry))


def stats_header(msg: Stats, workers: list[bytes], models: list[bytes]) -> bytes:
    """`msg`'s header from its entries' bytes (`workers`: worker_bytes of body.workers in
    order; `models`: model_bytes of body.models' items in order)."""
    body = msg.body
    rest = [pack(frames.to_wire(getattr(body, f))) for f in _BODY[2:]]
    return b"".join(
        (
            array_head(4),
            pack(msg.seq),
            array_head(len(_BODY)),
            array_head(len(workers)),
            *workers,
            map_head(len(models)),
            *models,
            *rest,
            pack(msg.part),
            pack(msg.parts),
        )
    )


def delta_header(msg: StatsDelta, workers: list[bytes], models: list[bytes]) -> bytes:
    """`msg`'s header from its changed entries' bytes (each: the packed name, then the
    packed map of its changed fields; in msg.workers' / msg.models' order)."""
    parts = [array_head(len(_DELTA)), pack(msg.seq), pack(msg.base)]
    parts += [map_head(len(workers)), *workers]
    parts += [pack(frames.to_wire(getattr(msg, f))) for f in _DELTA[3:6]]
    parts += [map_head(len(models)), *models]
    parts += [pack(frames.to_wire(getattr(msg, f))) for f in _DELTA[7:]]
    return b"".join(parts)
