"""Which models the live stages cover, from an index of one STATS snapshot: what making room
asks for every stage it might unload (planner.py `_make_room`).

`Planner.covered(model, workers)` routes the model as the broker would (routing.find_route):
a scan of every worker's stages, per model. Making room asks it twice per model a candidate
stage serves, for every candidate stage of the worker, for every load waiting for room: at 105
models on 16 workers, seconds per snapshot. `Coverage` indexes the snapshot once: which
workers hold each stage key, and the spans held (per start position). A model is covered when
its keys over the held spans chain position 0 to its end (the planner reads no dtype from
STATS, so any held stage joins any other, as in find_route); without one (worker, key) when
the same holds with that worker's copy left out. A check costs the spans held, not the
workers times their stages.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

KeyOf = Callable[[str, int, int], "str | None"]


class Coverage:
    """One snapshot's stages, indexed (module docstring). Pure; built per planner snapshot."""

    def __init__(
        self, workers: Mapping[str, Any], key_of: KeyOf, manifests: Mapping[str, Any]
    ) -> None:
        self.key_of = key_of
        self.manifests = manifests  # a model's chain length (an unknown model: not covered)
        self.holders: dict[str, set[str]] = {}  # stage key -> workers holding it
        # the spans held per family (a stage key hashes its family's fingerprint: a model's
        # key matches only stages of its family), None: stages of unknown or unfingerprinted
        # models, looked at for every model: family -> start -> ends
        self._held_by: dict[str | None, dict[int, set[int]]] = {}
        for w in workers.values():
            for key, st in w.stages.items():
                self.holders.setdefault(key, set()).add(w.name)
                by = self._held_by.setdefault(self._family(st.model), {})
                by.setdefault(st.start, set()).add(st.end)
        self._ends: dict[str | None, dict[int, list[int]]] = {}  # family -> start -> ends
        self._users: dict[tuple[int, int, str | None], dict[str | None, list[str]]] = {}
        self._of_family: dict[str | None, list[str]] = {}  # users' candidates per family
        self._covered: dict[str, bool] = {}
        self._spans: dict[str, list[tuple[int, int, str]]] = {}  # model -> its held spans
        self._without: dict[tuple[str, str], bool] = {}  # (worker, key) -> still_covered

    def covers(self, model: str, without: tuple[str, str] | None = None) -> bool:
        """Whether the held stages chain `model` (without `without` = (worker, key)'s copy).
        Leaving out a copy changes nothing when another worker holds the key too (or that
        worker holds none): only a sole copy is looked at, over the model's held spans."""
        if without is not None:
            held = self.holders.get(without[1], ())
            if len(held) != 1 or without[0] not in held:
                without = None
        if without is None and model in self._covered:
            return self._covered[model]
        m = self.manifests.get(model)
        n = 0 if m is None else len(m.chain)
        ok = False
        if n:
            spans = self._held(model, n)
            gone = without[1] if without is not None else None
            reach = {0}
            for start, end, key in spans:  # by start: positions only increase
                if start in reach and key != gone:
                    reach.add(end)
            ok = n in reach
        if without is None:
            self._covered[model] = ok
        return ok

    def _family(self, model: str) -> str | None:
        return getattr(self.manifests.get(model), "fingerprint", "") or None

    def _ends_of(self, family: str | None) -> dict[int, list[int]]:
        """start -> the ends held there that a model of `family` may have keys over (None:
        a model without a fingerprint, whose key derives from its config: every span held)."""
        ends = self._ends.get(family)
        if ends is None:
            merged: dict[int, set[int]] = {}
            groups = self._held_by if family is None else (family, None)
            for f in groups:
                for start, e in self._held_by.get(f, {}).items():
                    merged.setdefault(start, set()).update(e)
            ends = self._ends[family] = {start: sorted(e) for start, e in merged.items()}
        return ends

    def _held(self, model: str, n: int) -> list[tuple[int, int, str]]:
        """(start, end, key) of the spans some worker holds with `model`'s key, by start."""
        spans = self._spans.get(model)
        if spans is None:
            spans = []
            held = self._ends_of(self._family(model))
            for start in range(n):
                for end in held.get(start, ()):
                    if end > n:
                        continue
                    key = self.key_of(model, start, end)
                    if key is not None and self.holders.get(key):
                        spans.append((start, end, key))
            self._spans[model] = spans
        return spans

    def users(
        self, start: int, end: int, key: str, models: Collection[str], under: str | None = None
    ) -> list[str]:
        """The models (of `models`, sorted) whose key over [start, end) is `key`; `under`: the
        model the stage was loaded under, whose family's models (and those without a
        fingerprint) are the only ones whose key can be it (`models`: the same for one
        Coverage)."""
        family = None if under is None else self._family(under)
        by_key = self._users.get((start, end, family))
        if by_key is None:
            by_key = self._users[(start, end, family)] = {}
            for m in self._candidates(models, family):
                by_key.setdefault(self.key_of(m, start, end), []).append(m)
        return by_key.get(key, [])

    def _candidates(self, models: Collection[str], family: str | None) -> list[str]:
        """`models` sorted, only `family`'s and those without a fingerprint (None: all)."""
        got = self._of_family.get(family)
        if got is None:
            got = sorted(models)
            if family is not None:
                got = [m for m in got if self._family(m) in (family, None)]
            self._of_family[family] = got
        return got

    def still_covered(
        self,
        worker: str,
        key: str,
        start: int,
        end: int,
        models: Collection[str],
        under: str | None = None,
    ) -> bool:
        """Whether every model of `models` the stage `key` over [start, end) serves that is
        covered stays covered without `worker`'s copy (memoized: `models` is the same for
        one Coverage, the target's); `under`: the model it was loaded under (`users`)."""
        k = (worker, key)
        ok = self._without.get(k)
        if ok is None:
            users = self.users(start, end, key, models, under)
            ok = self._without[k] = all(
                self.covers(m, (worker, key)) for m in users if self.covers(m)
            )
        return ok
