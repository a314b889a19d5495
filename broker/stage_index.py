"""The broker's routing index: which workers advertise which live stage, so a route is found
from the stages that can serve the model instead of a scan over every worker's stages.

A stage serves a model over [start, end) when its key is `key_of(model, start, end)`. The
index keeps, per key, the (worker, stage) pairs advertising it (live stages only: not the ones
being drained), and how many stages advertise each span. The edges of a model (start position
-> [(worker, stage)]) are then its key over each advertised span, looked up: work in the number
of distinct spans (at most chain_len^2 / 2), not in workers x stages. Edges are listed in the
order `routing.find_route`'s scan would meet them (workers by `repr`, then each worker's stage
order), so the same route is chosen.

Freshness, without a scan: the worker registry (`workers.Registry`) collects the workers whose
stages or drains changed, or that joined or left; only their entries are re-indexed, and only
the cached edges of the models of the families those stages belong to are dropped (all of
them when a span appears that no stage advertised before, or when `keys_gen` says the models'
stage keys may have changed: reload, SET_CHAIN).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

from blockllm.broker.routing import WorkerView

Edges = dict[int, list[tuple[Hashable, Any]]]
Entry = tuple[tuple[str, int], Hashable, Any]  # ((repr(worker), stage index), worker, stage)
KeyOf = Callable[[str, int, int], "str | None"]


class StageIndex:
    """Key -> advertising (worker, stage) pairs, and the spans advertised (module docstring).
    `family_of(model)` names a model's family (None: unknown), whose cached edges a change of
    one of its stages drops."""

    def __init__(self, family_of: Callable[[str], Hashable | None]) -> None:
        self.family_of = family_of
        self.by_key: dict[str, list[Entry]] = {}
        self.span_count: dict[tuple[int, int], int] = {}
        self.spans: list[tuple[int, int]] = []
        self.names: dict[str, Hashable] = {}  # worker name -> peer
        self._indexed: dict[Hashable, tuple[str, tuple[Any, ...]]] = {}  # peer -> (name, stages)
        self._keys_gen = -1
        self._built = False
        self._edges: dict[str, Edges] = {}
        self._coverable: dict[str, bool] = {}
        self._families: dict[Hashable, set[str]] = {}  # family -> models with cached edges

    # -- freshness ----------------------------------------------------------------------------
    def _fresh(self, workers: Mapping[Hashable, Any], keys_gen: int) -> None:
        dirty = getattr(workers, "dirty", None)
        if keys_gen != self._keys_gen:
            self._keys_gen = keys_gen
            self._drop_all()
        if not self._built or dirty is None:  # first use, or a plain dict: index everything
            self._built = dirty is not None
            for peer in list(self._indexed):
                self._unindex(peer)
            for peer in workers:
                self._index(peer, workers[peer])
            if dirty is not None:
                dirty.clear()
            self._after(set(), set(), new_span=True)
            return
        if not dirty:
            return
        touched: set[str] = set()
        models: set[str] = set()  # of the stages that went or came
        new_span = False
        for peer in list(dirty):
            old = self._indexed.get(peer)
            touched |= self._unindex(peer)
            models.update(st.model for st in (old[1] if old else ()))
            w = workers.get(peer)
            if w is not None:
                keys, fresh = self._index(peer, w)
                touched |= keys
                new_span |= fresh
                models.update(st.model for st in self._indexed[peer][1])
        dirty.clear()
        self._after(touched, models, new_span)

    def _index(self, peer: Hashable, w: Any) -> tuple[set[str], bool]:
        stages = tuple(w.live_stages())
        self._indexed[peer] = (w.name, stages)
        self.names[w.name] = peer
        order = repr(peer)
        keys: set[str] = set()
        new_span = False
        for i, s in enumerate(stages):
            self.by_key.setdefault(s.key, []).append(((order, i), peer, s))
            span = (s.start, s.end)
            n = self.span_count.get(span, 0)
            new_span |= n == 0
            self.span_count[span] = n + 1
            keys.add(s.key)
        return keys, new_span

    def _unindex(self, peer: Hashable) -> set[str]:
        old = self._indexed.pop(peer, None)
        if old is None:
            return set()
        name, stages = old
        if self.names.get(name) == peer:
            del self.names[name]
        keys = set()
        for s in stages:
            keys.add(s.key)
            span = (s.start, s.end)
            self.span_count[span] -= 1
            if not self.span_count[span]:
                del self.span_count[span]
        for key in keys:
            entries = [e for e in self.by_key.get(key, ()) if e[1] != peer]
            if entries:
                self.by_key[key] = entries
            else:
                self.by_key.pop(key, None)
        return keys

    def _after(self, touched: set[str], models: set[str], new_span: bool) -> None:
        """Re-sort the changed keys' entries; drop the cached edges of the families whose
        stages changed (every family's when a new span appeared or a family is unknown)."""
        self.spans = sorted(self.span_count)
        for key in touched:
            entries = self.by_key.get(key)
            if entries:
                entries.sort(key=lambda e: e[0])
        families = {self.family_of(m) for m in models}
        if new_span or None in families:
            self._drop_all()
            return
        for fam in families:
            for model in self._families.pop(fam, ()):
                self._edges.pop(model, None)
                self._coverable.pop(model, None)

    def _drop_all(self) -> None:
        self._edges, self._coverable, self._families = {}, {}, {}

    # -- lookups ------------------------------------------------------------------------------
    def edges(
        self,
        model: str,
        chain_len: int,
        workers: Mapping[Hashable, Any],
        keys_gen: int,
        key_of: KeyOf,
    ) -> Edges:
        """Start position -> [(worker, stage)] of the live stages serving `model`."""
        self._fresh(workers, keys_gen)
        out = self._edges.get(model)
        if out is None:
            found: dict[int, list[Entry]] = {}
            for start, end in self.spans:
                if not 0 <= start < end <= chain_len:
                    continue
                key = key_of(model, start, end)
                for entry in self.by_key.get(key, ()) if key is not None else ():
                    found.setdefault(start, []).append(entry)
            out = {
                start: [(peer, s) for _, peer, s in sorted(entries, key=lambda e: e[0])]
                for start, entries in found.items()
            }
            self._edges[model] = out
            self._families.setdefault(self.family_of(model), set()).add(model)
        return out

    def coverable(
        self,
        model: str,
        chain_len: int,
        workers: Mapping[Hashable, Any],
        keys_gen: int,
        key_of: KeyOf,
    ) -> bool:
        """Whether the live stages chain 0..chain_len of `model` at all (any worker available):
        a waiting request of a model that is not coverable is not routed again until its
        family's stages change."""
        edges = self.edges(model, chain_len, workers, keys_gen, key_of)
        ok = self._coverable.get(model)
        if ok is None:
            reach = {0}
            for pos in range(chain_len):
                if pos in reach:
                    reach.update(s.end for _, s in edges.get(pos, ()))
            ok = self._coverable[model] = chain_len in reach
        return ok

    def peers(self, workers: Mapping[Hashable, Any], keys_gen: int) -> dict[str, Hashable]:
        """Worker name -> peer of the registered workers."""
        self._fresh(workers, keys_gen)
        return self.names


class LiveViews(Mapping):
    """`WorkerView`s of the registered workers, each built when first looked up (routing reads
    only the workers the index names): `available(peer, worker)` says which may take work."""

    def __init__(self, workers: Mapping[Hashable, Any], available: Callable[[Hashable, Any], bool]):
        self.workers = workers
        self.available = available
        self._views: dict[Hashable, WorkerView] = {}

    def __getitem__(self, peer: Hashable) -> WorkerView:
        view = self._views.get(peer)
        if view is None:
            w = self.workers[peer]
            view = WorkerView(w.live_stages(), w.load(), self.available(peer, w))
            self._views[peer] = view
        return view

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self.workers)

    def __len__(self) -> int:
        return len(self.workers)
