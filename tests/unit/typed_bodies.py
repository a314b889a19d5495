"""Test support: a STATUS / STATS body (or entry) typed from the JSON-shaped data a test writes
(the inverse of `protocol.plain`), so that tests state bodies as `blockllm status --json`
shows them."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from blockllm.broker.protocol import PlannedHop, PlannedRoute, StatsBody, StatusBody


def typed(cls: type, value: Any) -> Any:
    """`cls` from a map of its field names (a substitution's "from" for `from_`); the fields
    the map lacks keep their defaults."""
    if isinstance(value, cls):
        return value
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = "from" if f.name == "from_" else f.name
        if key in value:
            kwargs[f.name] = _conv(hints[f.name], value[key])
    return cls(**kwargs)


def stats(body: dict[str, Any]) -> StatsBody:
    return typed(StatsBody, body)


def status(body: dict[str, Any]) -> StatusBody:
    return typed(StatusBody, body)


def _hop(v: Any) -> PlannedHop:
    if isinstance(v, PlannedHop):
        return v
    worker, spans = v
    return PlannedHop(worker, tuple((int(a), int(b)) for a, b in spans))


def _conv(tp: Any, v: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is PlannedHop:
        return _hop(v)
    if tp is PlannedRoute:
        if isinstance(v, PlannedRoute):
            return v
        hops, weight = v
        return PlannedRoute(tuple(_hop(h) for h in hops), float(weight))
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return None if v is None else _conv(inner, v)
    if origin is tuple:
        return tuple(_conv(args[0], x) for x in v)
    if origin is dict:
        return {k: _conv(args[1], x) for k, x in v.items()}
    if dataclasses.is_dataclass(tp):
        return typed(tp, v) if isinstance(v, dict) else v
    if tp is float:
        return float(v)
    if tp in (int, bool):
        return tp(v)
    return v
