"""The broker's routing index: which workers advertise which live stage, so a route is found
from the stages that can serve the model instead of a scan over every worker's stages.

A stage serves a model over [start, end) when its key is `key_of(model, start, end)`; the key
hashes the family's fingerprint (zoo/chain.py stage_key), so only stages of the model's family
can. The index keeps, per key, the (worker, stage) pairs advertising it (live stages only: not
the ones being drained), and per family how many stages advertise each span. The edges of a
model (start position -> [(worker, stage)]) are then its key over each span its family's stages
advertise, looked up: work in the number of distinct spans (at most chain_len^2 / 2), not in
workers x stages; listed in the order `routing.find_route`'s scan would meet them (workers by
`repr`; a worker's own stage order changes no route), so the same route is chosen.

Freshness, without a scan: the worker registry (`workers.Registry`) collects the workers whose
stages or drains changed, or that joined or left; only their entries are re-indexed, and only
the cached edges that looked up the keys of the stages that went or came are dropped (and, for
a stage over a span its family's stages did not advertise before, which no cached edges of that
family looked up, those of the family's models whose key over the span is advertised: the
others watch that key from then on; of every family's models for a stage of an unknown model,
whose spans every model looks up); all of them when `keys_gen` says the models' stage keys
may have changed (reload, SET_CHAIN). What was dropped is kept for `take_dropped`: the waiting
requests of those models may have a route now (broker/waiting.py).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

from blockllm.broker.lazy_edges import Entry, LazyEdges, Sorted, by_order
from blockllm.broker.routing import Solo, WorkerView, solo_routes

Edges = Mapping[int, list[tuple[Hashable, Any]]]  # (a LazyEdges)
KeyOf = Callable[[str, int, int], "str | None"]
# (starts, keys): the model's key over each span looked up, and the span's start (two lists,
# not a tuple per span: kept per model, they are a few objects for the garbage collector)
Looked = tuple[list[int], list[str]]


class StageIndex:
    """Key -> advertising (worker, stage) pairs, and the spans each family's stages advertise
    (module docstring). `family_of(model)` names a model's family (None: unknown)."""

    def __init__(self, family_of: Callable[[str], Hashable | None]) -> None:
        self.family_of = family_of
        # key -> (peer, dtype) -> its entry
        self.by_key: dict[str, dict[tuple[Hashable, str], Entry]] = {}
        self._sorted: dict[str, Sorted] = {}  # key -> its entries in scan order (`_order`)
        # family -> span -> stages advertising it (a stage of an unknown model: family None,
        # whose spans every model looks up)
        self.span_count: dict[Hashable, dict[tuple[int, int], int]] = {}
        self._spans: dict[Hashable, list[tuple[int, int]]] = {}  # sorted, per family (lazily)
        self.names: dict[str, Hashable] = {}  # worker name -> peer
        # peer -> (name, (key, dtype) -> (its live stage, the stage's family when indexed))
        self._indexed: dict[Hashable, tuple[str, dict[tuple[str, str], tuple[Any, Hashable]]]] = {}
        # peer -> (its stages, its drained keys) when last indexed: when only drains changed,
        # only the keys drained or undrained since are looked at
        self._basis: dict[Hashable, tuple[Any, frozenset[str]]] = {}
        self._keys_gen = -1
        self._built = False
        self._edges: dict[str, LazyEdges] = {}
        self._solo: dict[str, Solo | None] = {}  # model -> routing.solo_routes of its edges
        # family -> models with cached edges or dropped quietly (`_drop`)
        self._families: dict[Hashable, set[str]] = {}
        self._quiet: set[str] = set()  # models whose edges a stage going dropped (not woken)
        self._chain_len: dict[str, int] = {}  # model -> its chain length (cached edges)
        # model -> (spans generation, chain length, [(start, key)]): `_span_keys`
        # family -> the spans that were born or died, in order (`_span_keys` reads the ones
        # since a model's keys were found)
        self._span_log: dict[Hashable, list[tuple[int, int]]] = {}
        self._spans_keyed: dict[str, tuple[Any, int, dict, Looked]] = {}
        self._key_of: KeyOf = lambda model, start, end: None  # the last `edges` call's
        # key -> models whose edges looked it up (some may have none cached now: `_drop`);
        # model -> the family of its cached edges; model -> the span keys it watches
        self._watch: dict[str, set[str]] = {}
        self._family_of_cached: dict[str, Hashable] = {}
        self._watched: dict[str, Looked] = {}
        # what was dropped since `take_dropped` (the waiting requests of those models may have
        # a route now: broker/waiting.py), and since `take_shown` (the routes STATUS and STATS
        # show: broker/status.py ShownRoutes)
        self.dropped: set[str] = set()
        self.dropped_all = False
        self.shown_dropped: set[str] = set()
        self.shown_dropped_all = False

    # -- freshness ----------------------------------------------------------------------------
    def _fresh(self, workers: Mapping[Hashable, Any], keys_gen: int) -> None:
        dirty = getattr(workers, "dirty", None)
        if keys_gen != self._keys_gen:
            self._keys_gen = keys_gen
            self._drop_all()
        if not self._built or dirty is None:  # first use, or a plain dict: index everything
            self._built = dirty is not None
            for peer in list(self._indexed):
                self._reindex(peer, None)
            for peer in workers:
                self._reindex(peer, workers[peer])
            if dirty is not None:
                dirty.clear()
            self._spans = {}  # (sorted when first read: `_sorted_spans`)
            self._drop_all()
            return
        if not dirty:
            return
        changed: dict[str, bool] = {}  # keys of the stages that went or came -> one came
        born: set[tuple[Hashable, tuple[int, int]]] = set()  # (family, span) that appeared...
        died: set[tuple[Hashable, tuple[int, int]]] = set()  # ... or went (maybe both)
        for peer in list(dirty):
            self._reindex(peer, workers.get(peer), changed, born, died)
        dirty.clear()
        self._after(changed, born - died, born | died)

    def _reindex(
        self,
        peer: Hashable,
        w: Any,
        changed: dict[str, bool] | None = None,
        born: set[tuple[Hashable, Any]] | None = None,
        died: set[tuple[Hashable, Any]] | None = None,
    ) -> None:
        """Index `w`'s live stages (None: the worker left) in place of what `peer` had: only
        the stages that came or went are touched (a stage is its (key, dtype): the order of
        one worker's stages changes no route, as two of its stages from one position end at
        different positions: routing._cheapest). Their keys go to `changed`, the (family,
        span) pairs no stage advertised before to `born`, those none advertises now to
        `died`."""
        changed = {} if changed is None else changed
        born = set() if born is None else born
        died = set() if died is None else died
        name, kept = self._indexed.pop(peer, ("", {}))
        basis = self._basis.pop(peer, None)
        drains = frozenset(() if w is None else w.draining)
        if w is not None and basis is not None and basis[0] is w.stages and name == w.name:
            # the same stages, only drains changed: look at the keys drained or undrained
            diff = basis[1] ^ drains
            went = [k for k in kept if k[0] in diff and k[0] in drains]
            came = {
                (s.key, getattr(s, "dtype", "")): s
                for s in w.stages
                if s.key in diff and s.key not in drains
            }
        else:
            live = () if w is None else w.live_stages()
            now = {(s.key, getattr(s, "dtype", "")): s for s in live}
            went = [k for k in kept if k not in now]
            came = {k: s for k, s in now.items() if k not in kept}
        if name and self.names.get(name) == peer and (w is None or w.name != name):
            del self.names[name]
        for k in went:
            s, fam = kept.pop(k)
            changed.setdefault(s.key, False)
            self._sorted.pop(s.key, None)
            entries = self.by_key.get(s.key)
            if entries is not None:
                entries.pop((peer, k[1]), None)
                if not entries:
                    del self.by_key[s.key]
            counts = self.span_count[fam]
            span = (s.start, s.end)
            counts[span] -= 1
            if not counts[span]:
                del counts[span]
                died.add((fam, span))
        if w is None:
            return
        order = repr(peer)
        for k, s in came.items():
            if k in kept:
                continue
            fam = self.family_of(s.model)
            kept[k] = (s, fam)
            changed[s.key] = True
            self._sorted.pop(s.key, None)
            self.by_key.setdefault(s.key, {})[(peer, k[1])] = ((order, k[1]), peer, s)
            counts = self.span_count.setdefault(fam, {})
            span = (s.start, s.end)
            if span not in counts:
                born.add((fam, span))
            counts[span] = counts.get(span, 0) + 1
        self._basis[peer] = (w.stages, drains)
        self._indexed[peer] = (w.name, kept)
        self.names[w.name] = peer

    def _after(
        self,
        changed: dict[str, bool],
        born: set[tuple[Hashable, Any]],
        touched: set[tuple[Hashable, Any]],
    ) -> None:
        """Re-sort the spans of the families whose spans were `touched` (born or died: logged
        for `_span_keys`); drop the cached edges that looked up a
        `changed` key, and, for a span `born` to a family (its models' cached edges did not
        look it up), those of the family's models whose key over it a stage advertises (the
        others watch that key from now on); of every family's models when the stage's model is
        unknown (family None, whose spans every model looks up). Only a stage that came wakes
        the models it drops (`dropped`): stages going or draining give no model a route, so
        the models they drop are dropped quietly (`_quiet`) and woken by the next stage that
        comes over a key they watch or a span born to their family."""
        for fam, span in touched:
            self._span_log.setdefault(fam, []).append(span)
        for fam in {fam for fam, _ in touched}:  # (sorted again when a model's keys are)
            self._spans.pop(fam, None)
            if not self.span_count.get(fam):
                self.span_count.pop(fam, None)
        # (a span that died is no key's any more: the keys of its stages are `changed`)
        for key, came in changed.items():
            watchers = self._watch.get(key)
            if watchers:
                for model in watchers & self._edges.keys():  # (those with edges cached)
                    self._drop(model, wake=came)
                if came and self._quiet:
                    for model in watchers & self._quiet:
                        self._drop(model)
        for fam, (start, end) in born:
            # (a span of an unknown model's stage: every family's models may look it up)
            groups = list(self._families.values()) if fam is None else [self._families.get(fam)]
            for model in [m for models in groups for m in models or ()]:
                chain_len = self._chain_len.get(model, 0)
                ok = 0 <= start < end <= chain_len
                key = self._key_of(model, start, end) if ok else None
                if key is None:
                    continue  # no key of the model there: its edges cannot use the span
                if key in self.by_key:
                    self._drop(model)
                else:  # nothing serves it there yet: a stage that comes drops its edges
                    self._watch.setdefault(key, set()).add(model)

    def _drop(self, model: str, wake: bool = True) -> None:
        """Forget the model's cached edges (a model without any: nothing, unless `wake` and
        it was dropped quietly) and, with `wake`, tell `take_dropped` (its waiting requests
        may have a route now); without, it stays in its family's models (`_quiet`) until a
        stage that comes wakes it. Its watches stay: a key that changes drops only models
        with cached edges, and a rebuild watches the same keys again unless its family's
        spans changed."""
        if self._edges.pop(model, None) is None:
            if wake and model in self._quiet:
                self._quiet.discard(model)
                self._uncache(model)
                self.dropped.add(model)
            return
        self._solo.pop(model, None)
        self.shown_dropped.add(model)
        if wake:
            self._uncache(model)
            self.dropped.add(model)
        else:
            self._quiet.add(model)

    def _uncache(self, model: str) -> None:
        self._chain_len.pop(model, None)
        fam = self._family_of_cached.pop(model, None)
        same = self._families.get(fam)
        if same is not None:
            same.discard(model)
            if not same:
                del self._families[fam]

    def forget(self, models: set[str]) -> None:
        """Drop what is kept of `models` (tenants that left or arrived: a name may come back
        with other stage keys) without touching the other models' routes."""
        for model in models:
            self._drop(model)
            self._spans_keyed.pop(model, None)
            self._watched.pop(model, None)

    def _drop_all(self) -> None:
        self._edges, self._families, self._solo = {}, {}, {}
        self._watch, self._family_of_cached, self._chain_len = {}, {}, {}
        self._spans_keyed, self._watched, self._quiet = {}, {}, set()
        self.dropped_all = self.shown_dropped_all = True

    def take_dropped(self, workers: Mapping[Hashable, Any], keys_gen: int) -> tuple[bool, set[str]]:
        """(every model's, else the models whose) cached edges were dropped since the last call,
        after taking in the workers' changes."""
        self._fresh(workers, keys_gen)
        out = (self.dropped_all, self.dropped)
        self.dropped_all, self.dropped = False, set()
        return out

    def take_shown(self, workers: Mapping[Hashable, Any], keys_gen: int) -> tuple[bool, set[str]]:
        """As `take_dropped`, for its other reader (broker/status.py ShownRoutes)."""
        self._fresh(workers, keys_gen)
        out = (self.shown_dropped_all, self.shown_dropped)
        self.shown_dropped_all, self.shown_dropped = False, set()
        return out

    def peers_of(
        self,
        model: str,
        chain_len: int,
        workers: Mapping[Hashable, Any],
        keys_gen: int,
        key_of: KeyOf,
    ) -> set[Hashable]:
        """The workers advertising a live stage that serves `model` on some chain of them to
        the end (those whose credit a waiting request of it may need)."""
        edges = self.edges(model, chain_len, workers, keys_gen, key_of)
        return edges.peers()

    # -- lookups ------------------------------------------------------------------------------
    def edges(
        self,
        model: str,
        chain_len: int,
        workers: Mapping[Hashable, Any],
        keys_gen: int,
        key_of: KeyOf,
    ) -> LazyEdges:
        """Start position -> [(worker, stage)] of the live stages serving `model`: its key
        looked up over each span its family's stages (or stages of unknown models) advertise;
        only those on some chain of them to the end (the others are in no route)."""
        self._key_of = key_of
        self._fresh(workers, keys_gen)
        out = self._edges.get(model)
        if out is None:
            fam = self.family_of(model)
            found: dict[int, list[Sorted]] = {}
            by_key, ordered = self.by_key, self._sorted
            starts, keys = self._looked_up(model, fam, chain_len, key_of)
            for start, key in zip(starts, keys, strict=True):
                if key in by_key:
                    hit = ordered.get(key) or self._order(key)
                    found.setdefault(start, []).append(hit)
            # only the stages on some chain to the end (one ending where nothing goes on to the
            # end changes no route: routing._cheapest's states there never reach it)
            live = {chain_len}
            parts: dict[int, list[Sorted]] = {}
            for start in sorted(found, reverse=True):
                kept: list[Sorted] = []
                for hit in found[start]:  # (in the order looked up)
                    if hit[0] is None:  # (stages of the key ending at several positions)
                        entries = [e for e in hit[1] if e[2].end in live]
                        if entries:
                            kept.append((None, entries, None))
                    elif hit[0] in live:
                        kept.append(hit)
                if kept:
                    live.add(start)
                    parts[start] = kept
            out = LazyEdges(parts)
            self._edges[model] = out
            self._quiet.discard(model)
            self._families.setdefault(fam, set()).add(model)
            self._family_of_cached[model] = fam
            self._chain_len[model] = chain_len
        return out

    def _order(self, key: str) -> Sorted:
        """The key's entries in scan order (`by_order`), as (their end when they all share
        one else None, entries, [(worker, stage)]): kept until a stage of the key comes or
        goes, and shared by the edges of every model looking the key up (read-only)."""
        entries = sorted(self.by_key[key].values(), key=by_order)
        ends = {e[2].end for e in entries}
        end = next(iter(ends)) if len(ends) == 1 else None
        hit = self._sorted[key] = (end, entries, [(peer, s) for _, peer, s in entries])
        return hit

    def _looked_up(self, model: str, fam: Hashable, chain_len: int, key_of: KeyOf) -> Looked:
        """`_span_keys`, the model watching each of them."""
        looked = self._span_keys(model, fam, chain_len, key_of)
        old = self._watched.get(model)
        if old is not looked:  # (watched since its spans changed: watches are never taken
            # back but with every other, `_drop_all`, so only the new keys are added)
            had = set(old[1]) if old is not None else ()
            for key in looked[1]:
                if key not in had:
                    self._watch.setdefault(key, set()).add(model)
            self._watched[model] = looked
        return looked

    def _sorted_spans(self, fam: Hashable) -> list[tuple[int, int]]:
        """The spans the family's stages advertise, sorted (kept until they change)."""
        spans = self._spans.get(fam)
        if spans is None:
            spans = self._spans[fam] = sorted(self.span_count.get(fam, ()))
        return spans

    def _span_keys(self, model: str, fam: Hashable, chain_len: int, key_of: KeyOf) -> Looked:
        """(start, the model's key) over each span its family's stages (or stages of unknown
        models) advertise, in span order: kept, and when those spans change, the model's key
        looked up again over the spans born or died since (from the family's log), not over
        every span (the keys changing: `_drop_all`)."""
        logs = self._span_log
        own = logs.get(fam, [])
        unknown = logs.get(None, []) if fam is not None else []
        pos = (len(own), len(unknown))
        hit = self._spans_keyed.get(model)
        if hit is not None and hit[1] == chain_len:
            if hit[0] == pos:
                return hit[3]
            keyed = hit[2]
            counts = self.span_count.get(fam, {})
            others = self.span_count.get(None, {}) if fam is not None else {}
            for span in {*own[hit[0][0] :], *unknown[hit[0][1] :]}:
                start, end = span
                key = None
                if (span in counts or span in others) and 0 <= start < end <= chain_len:
                    key = key_of(model, start, end)
                if key is None:
                    keyed.pop(span, None)
                else:
                    keyed[span] = key
        else:
            keyed = {}
            spans = self._sorted_spans(fam)
            if fam is not None and self.span_count.get(None):
                spans = sorted({*spans, *self._sorted_spans(None)})
            for span in spans:  # (the span objects themselves: no new ones kept per model)
                start, end = span
                ok = 0 <= start < end <= chain_len
                if ok and (key := key_of(model, start, end)) is not None:
                    keyed[span] = key
        order = sorted(keyed)
        out = ([span[0] for span in order], [keyed[span] for span in order])
        self._spans_keyed[model] = (pos, chain_len, keyed, out)
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
        # (the edges keep only stages on some chain to the end: position 0 has one iff the
        # stages chain the model)
        return chain_len == 0 or 0 in edges

    def solo(
        self,
        model: str,
        chain_len: int,
        workers: Mapping[Hashable, Any],
        keys_gen: int,
        key_of: KeyOf,
    ) -> tuple[Edges, Solo | None]:
        """The model's edges, and the workers that chain it alone (`routing.solo_routes` of
        those edges, kept with them)."""
        edges = self.edges(model, chain_len, workers, keys_gen, key_of)
        if model not in self._solo:
            self._solo[model] = solo_routes(chain_len, edges)
        return edges, self._solo[model]

    def peers(self, workers: Mapping[Hashable, Any], keys_gen: int) -> dict[str, Hashable]:
        """Worker name -> peer of the registered workers."""
        self._fresh(workers, keys_gen)
        return self.names


class LiveViews(Mapping):
    """`WorkerView`s of the registered workers, each built when first looked up (routing reads
    only the workers the index names): `available(peer, worker)` says which may take work;
    `loaded=False`: every load 0 (the route an idle cluster would give: STATUS, STATS)."""

    def __init__(
        self,
        workers: Mapping[Hashable, Any],
        available: Callable[[Hashable, Any], bool],
        loaded: bool = True,
    ):
        self.workers = workers
        self.available = available
        self.loaded = loaded
        self._views: dict[Hashable, WorkerView] = {}

    def __getitem__(self, peer: Hashable) -> WorkerView:
        view = self._views.get(peer)
        if view is None:
            w = self.workers[peer]
            load = w.load() if self.loaded else 0.0
            view = WorkerView(w.live_stages(), load, self.available(peer, w), w.live_keys())
            self._views[peer] = view
        return view

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self.workers)

    def __len__(self) -> int:
        return len(self.workers)
