"""A model's routing edges as the routing index (broker/stage_index.py) keeps them: per start
position, the sorted entries of each key serving it there, merged into one list in scan order
only when a route reads that start (coverage and the workers involved are read without it)."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterator, Mapping
from typing import Any

Entry = tuple[tuple[str, str], Hashable, Any]  # ((repr(worker), dtype), worker, stage)
# (the key's end if all its stages share one, entries, [(worker, stage)] or None): a key's
# entries in scan order as StageIndex._order keeps them (shared), or some of them (filtered)
Sorted = tuple["int | None", list[Entry], "list[tuple[Hashable, Any]] | None"]


def by_order(entry: Entry) -> tuple[str, str]:
    return entry[0]


def _by_entry(entry_pair: tuple[Entry, Any]) -> tuple[str, str]:
    return entry_pair[0][0]


class LazyEdges(Mapping):
    """A model's edges (start -> [(worker, stage)] in scan order), each start's list merged
    from its keys' sorted entries when first read: the keys' own lists when one key serves
    the start, else their entries sorted by `by_order` (stable: ties in the order looked
    up). Coverage and the workers involved are read without merging; read-only."""

    __slots__ = ("_merged", "_parts")

    def __init__(self, parts: dict[int, list[Sorted]]) -> None:
        self._parts = parts
        self._merged: dict[int, list[tuple[Hashable, Any]]] = {}

    def __getitem__(self, start: int) -> list[tuple[Hashable, Any]]:
        got = self._merged.get(start)
        if got is None:
            parts = self._parts[start]
            if len(parts) == 1 and parts[0][2] is not None:  # one key's list, shared
                got = parts[0][2]
            else:  # (the keys' own (worker, stage) pairs: none made per model)
                both = [zip(p[1], p[2] or [e[1:] for e in p[1]], strict=True) for p in parts]
                kept = sorted(itertools.chain(*both), key=_by_entry)
                got = [pair for _, pair in kept]
            self._merged[start] = got
        return got

    def get(self, start: int, default: Any = None) -> Any:
        return self[start] if start in self._parts else default

    def __contains__(self, start: object) -> bool:
        return start in self._parts

    def __iter__(self) -> Iterator[int]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def peers(self) -> set[Hashable]:
        """The workers of every edge."""
        return {e[1] for parts in self._parts.values() for part in parts for e in part[1]}
