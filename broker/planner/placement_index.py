"""The indexed placement search: the same choices as a scan over every worker, in time that
does not grow with the number of workers that hold nothing of the chain being placed.

`place` (placement.py) cuts each replica of a chain into segments: at each position the worker
ranked first by `(-reach, load in steps, new bytes, bytes not resident, positions covered,
name)` takes the next segment. Scanning every worker at every position costs
O(workers x chain) per segment, 46 s for 2,000 models on 256 workers. Two kinds of worker:
- **touching** workers hold (or have resident) some block of the chain: their reach depends on
  what they hold, so it is computed for each of them exactly (a set difference first: the
  common case, "the rest of the chain fits", needs no walk);
- **plain** workers hold none of it: their reach, new bytes and churn are a function of their
  free room alone (one prefix-cost table per chain and start). The best of them is found from
  two sorted indexes: by free room (the farthest reach any plain worker has) and by the
  tie-break key `(load in steps, positions covered, name)` (the first plain worker
  whose room reaches that far).
`Cluster.holders` maps a block to the workers holding it, so the touching workers of a chain
are found without a scan. Indexes are updated when a segment is added (`Cluster.add`),
removed (`Cluster.remove`, incremental re-placement) or a worker leaves.

Nodes: after the first segment of a replica, a worker on the node of the previous segment's
worker ranks before one on another node of the same reach (the rank's second field, `cross`),
so a chain that must be cut stays inside a node when that costs no extra hop; the tie-break
index is also kept per node for that. Hops come first: a longer reach on another node still
wins (every hop is a message through the broker). A worker of unknown node (`WorkerInfo.node`
"") is a node of its own, and then, as when every worker is on one node, `cross` is the same
for every candidate: the placement is the one without nodes.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blockllm.broker.planner.placement import ModelInfo, WorkerInfo

Segment = tuple[str, int, int]  # (worker, start, end) of one replica of a chain
_ZEROS = itertools.repeat(0)  # map(sizes.get, blocks, _ZEROS): a size, 0 when unknown
_ONES = itertools.repeat(1)
# the tie-break tells workers' planned loads apart to 1/LOAD_STEPS of the mean worker load, or
# to 0.01 of the total demand where that is finer (up to 33 workers: as it always was); 0.01 of
# the total is 2.6x the mean at 256 workers, where it hid most differences (finer still costs
# block sharing: each worker's load then outranks its new bytes)
LOAD_STEPS = 3
KV_PAGE_TOKENS = 16  # tokens of the first geometry a worker's KV page holds (WorkerConfig)


class Chain:
    """What the search reads of one model, computed once: blocks per position, their sizes,
    prefix costs for a worker that holds nothing of it, work per position."""

    __slots__ = (
        "_index",
        "_suffix",
        "_where",
        "at",
        "blocks",
        "fresh",
        "info",
        "owners",
        "simple",
        "size",
        "total_work",
        "work",
    )

    def __init__(self, m: ModelInfo) -> None:
        self.info = m
        chain = m.chain
        n = len(chain)
        self.at = [(b,) for b in chain]  # ModelInfo.blocks_at
        if m.tied and n:
            self.at[-1] = (chain[-1], chain[0])
        k = min(n, len(m.block_bytes))  # ModelInfo.nbytes: the first position's size
        self.size: dict[str, int] = dict(
            zip(reversed(chain[:k]), reversed(m.block_bytes[:k]), strict=True)
        )
        self.blocks = frozenset(chain)  # a tied head's embedding is chain[0]
        self.simple = len(self.blocks) == n and not (m.tied and n)  # a block per position, once
        self._where: dict[str, list[int]] | None = None
        self._index: dict[str, int] | None = None
        self._suffix: dict[int, frozenset[str]] = {}
        given = m.compute or m.block_bytes  # ModelInfo.work
        if len(given) >= n:
            self.work = [float(x) for x in given[:n]] if given else [1.0] * n
        else:
            self.work = [m.work(p) for p in range(n)]
        self.total_work = sum(self.work) or 1.0
        self.fresh: dict[int, list[int]] = {}
        self.owners: list[frozenset[str]] | None = None

    def index(self) -> dict[str, int]:
        """Block -> its position (a chain with one block per position, none twice)."""
        if self._index is None:
            self._index = dict(zip(self.info.chain, range(len(self.at)), strict=True))
        return self._index

    @property
    def where(self) -> dict[str, list[int]]:
        """Block -> the positions holding it, ascending."""
        if self._where is None:
            self._where = {}
            for p, bs in enumerate(self.at):
                for b in bs:
                    self._where.setdefault(b, []).append(p)
        return self._where

    def suffix(self, pos: int) -> frozenset[str]:
        """The distinct blocks of positions pos.. (what a segment from pos may add)."""
        out = self._suffix.get(pos)
        if out is None:
            out = self._suffix[pos] = frozenset(b for bs in self.at[pos:] for b in bs)
        return out

    def owners_at(self, p: int) -> frozenset[str]:
        return self.owners_per_position()[p]

    def owners_per_position(self) -> list[frozenset[str]]:
        if self.owners is None:
            self.owners = [self.info.owners_at(q) for q in range(len(self.at))]
        return self.owners

    def nbytes(self, b: str) -> int:
        return self.size.get(b, 0)

    def fresh_costs(self, pos: int) -> list[int]:
        """costs[k]: new bytes of the segment [pos, pos + k + 1) on a worker holding nothing."""
        costs = self.fresh.get(pos)
        if costs is None and len(self.blocks) == len(self.at) and not self.info.tied:
            # every position one block, none repeated: the running sum of their sizes
            sizes = map(self.size.get, self.info.chain[pos:], itertools.repeat(0))
            costs = self.fresh[pos] = list(itertools.accumulate(sizes))
        if costs is None:
            seen: set[str] = set()
            total = 0
            costs = []
            for p in range(pos, len(self.at)):
                for b in self.at[p]:
                    if b not in seen:
                        seen.add(b)
                        total += self.nbytes(b)
                costs.append(total)
            self.fresh[pos] = costs
        return costs


class Cluster:
    """Placement state: per worker the blocks held, bytes, load, who covers what, and the
    indexes of the search (module docstring)."""

    def __init__(self, workers: Sequence[WorkerInfo], total_demand: float) -> None:
        self.workers = {w.name: w for w in workers}
        self.held: dict[str, dict[str, int]] = {w.name: {} for w in workers}  # block -> users
        self.used: dict[str, int] = dict.fromkeys(self.workers, 0)
        self.load: dict[str, float] = dict.fromkeys(self.workers, 0.0)
        # worker -> (model, position) -> how many segments cover it there
        self.covers: dict[str, dict[tuple[str, int], int]] = {w: {} for w in self.workers}
        self.total = total_demand or 1.0
        self.load_unit = self.total / max(100, LOAD_STEPS * len(self.workers))
        self.holders: dict[str, set[str]] = {}  # block -> workers holding it
        self.resident_holders: dict[str, set[str]] = {}  # resident or refused there
        for w in workers:
            for b in w.resident | w.refused:  # a refused block: searched exactly (reach)
                self.resident_holders.setdefault(b, set()).add(w.name)
        self._room_key: dict[str, tuple] = {}
        self._tie_key: dict[str, tuple] = {}
        self.by_room: list[tuple] = []  # (-free room, name), ascending: most room first
        self.by_tie: list[tuple] = []  # (load_key, positions covered, name)
        # node of each worker (unknown: its own), and the tie-break index per node
        self.node: dict[str, str] = {w.name: w.node or f"\0{w.name}" for w in workers}
        self.by_tie_at: dict[str, list[tuple]] = {}
        for w in self.workers:
            self._index(w)
        self.chains: dict[str, Chain] = {}
        self.targets: dict[str, int] = {}  # replicas wanted per model (place_in)
        # KV (worker/kv_cache.py): a page per decoder-layer block placed on a worker, pages of
        # the first geometry's size; a worker with KV too tight for a chain is searched exactly
        self.kv_layers: dict[str, int] = dict.fromkeys(self.workers, 0)
        self.kv_page: dict[str, int] = {w.name: w.kv_page_bytes for w in workers}
        # the layout derived from the segments (placement_layout): per worker its stages with
        # the models each serves, and per worker per model the spans of those stages
        self.grouped: dict[str, list] = {}
        self.spans_of: dict[str, dict[str, list[tuple[int, int]]]] = {}

    # -- indexes ------------------------------------------------------------------------------
    def room(self, w: str) -> float:
        return self.workers[w].capacity_bytes - self.used[w]

    def load_key(self, w: str) -> int:
        """w's planned load in the tie-break's steps (LOAD_STEPS)."""
        return round(self.load[w] / self.load_unit)

    def tie(self, w: str) -> tuple:
        return (self.load_key(w), len(self.covers[w]), w)

    def _index(self, w: str) -> None:
        rk, tk = (-self.room(w), w), self.tie(w)
        self._room_key[w], self._tie_key[w] = rk, tk
        bisect.insort(self.by_room, rk)
        bisect.insort(self.by_tie, tk)
        bisect.insort(self.by_tie_at.setdefault(self.node[w], []), tk)

    def _unindex(self, w: str) -> None:
        tk = self._tie_key.pop(w)
        for keys, key in (
            (self.by_room, self._room_key.pop(w)),
            (self.by_tie, tk),
            (self.by_tie_at[self.node[w]], tk),
        ):
            i = bisect.bisect_left(keys, key)
            assert keys[i] == key, (w, key)
            del keys[i]

    def chain(self, m: ModelInfo) -> Chain:
        c = self.chains.get(m.name)
        if c is None or c.info is not m:
            c = self.chains[m.name] = Chain(m)
        return c

    def touching(self, c: Chain) -> set[str]:
        """Workers that hold or have resident some block of the chain, or whose KV arena
        could not take all of its decoder layers (their reach is not a function of room)."""
        none = itertools.repeat(())
        out: set[str] = set().union(*map(self.holders.get, c.blocks, none))
        if self.resident_holders:
            out.update(*map(self.resident_holders.get, c.blocks, none))
        if c.info.kv_row_bytes > 0:
            layers = len(c.at) - 2
            out.update(w for w in self.workers if self.kv_left(w, c) < layers)
        return out

    def kv_left(self, w: str, c: Chain) -> int:
        """Decoder layers of c that w's KV arena can still take (a page each); a large number
        when not limited, 0 when c's rows do not fit its page (worker/kv_cache.py)."""
        budget, row = self.workers[w].kv_budget_bytes, c.info.kv_row_bytes
        if budget <= 0 or row <= 0:
            return 1 << 30
        page = self.kv_page[w] or 2 * KV_PAGE_TOKENS * row
        return 0 if 2 * row > page else max(0, budget // page - self.kv_layers[w])

    def _kv_new(self, c: Chain, w: str, blocks: Iterable[str], start: int, end: int) -> int:
        """Decoder layers among positions [start, end) of c whose block w does not hold."""
        held = self.held[w]
        return sum(
            1
            for p in range(max(1, start), min(end, len(c.at) - 1))
            if c.at[p][0] not in held and c.at[p][0] in blocks
        )

    # -- the search ---------------------------------------------------------------------------
    def reach(self, w: str, c: Chain, start: int) -> tuple[int, int, int]:
        """(farthest end, new bytes, bytes not resident) of a segment of c on w from start."""
        info = self.workers[w]
        room = info.capacity_bytes - self.used[w]
        held = self.held[w]
        resident, refused = info.resident, info.refused
        suffix = c.suffix(start)
        blocked = bool(refused) and not refused.isdisjoint(suffix)
        missing = suffix.difference(held)
        new = sum(map(c.size.get, missing, _ZEROS))
        if info.kv_budget_bytes <= 0 or c.info.kv_row_bytes <= 0:
            kv_room = 1 << 30  # kv_left: not limited
        else:
            kv_room = self.kv_left(w, c)
        kv_ok = kv_room >= len(c.at) - 2 or self._kv_new(c, w, missing, start, len(c.at)) <= kv_room
        if new <= room and not blocked and kv_ok:  # the rest of the chain fits
            if not resident:
                return len(c.at), new, new
            churn = sum(c.nbytes(b) for b in missing if b not in resident)
            return len(c.at), new, churn
        if blocked:
            return self._walk(w, c, start, room, kv_room)
        # only the positions where a missing block first appears cost anything: the segment
        # ends at the first of them that does not fit (the walk below, without the others)
        first: dict[int, list[str]] = {}
        if c.simple:  # a block's one position
            index = c.index()
            for b in missing:
                first.setdefault(index[b], []).append(b)
        else:
            where = c.where
            for b in missing:
                ps = where[b]
                first.setdefault(ps[bisect.bisect_left(ps, start)], []).append(b)
        n = len(c.at)
        new = churn = layers = 0
        for q in sorted(first):
            extra = first[q]
            cost = sum(c.nbytes(b) for b in extra)
            kv = 1 if 1 <= q < n - 1 and c.at[q][0] in extra else 0
            if new + cost > room or layers + kv > kv_room:
                return q, new, churn
            layers += kv
            new += cost
            churn += sum(c.nbytes(b) for b in extra if b not in resident)
        return n, new, churn  # a layer block repeated: counted once here, twice by _kv_new

    def _walk(self, w: str, c: Chain, start: int, room: float, kv_room: int) -> tuple:
        """`reach` position by position (a worker refused some block of the chain)."""
        held = self.held[w]
        resident, refused = self.workers[w].resident, self.workers[w].refused
        blocked = True
        seen: set[str] = set()
        new = churn = layers = 0
        end = start
        for p in range(start, len(c.at)):
            if blocked and not refused.isdisjoint(c.at[p]):
                break  # the worker cannot get this position's block
            extra = [b for b in c.at[p] if b not in held and b not in seen]
            cost = sum(c.nbytes(b) for b in extra)
            kv = 1 if 1 <= p < len(c.at) - 1 and c.at[p][0] in extra else 0  # a new layer
            if new + cost > room or layers + kv > kv_room:
                break
            layers += kv
            seen.update(extra)
            new += cost
            churn += sum(c.nbytes(b) for b in extra if b not in resident)
            end = p + 1
        return end, new, churn

    def cross(self, w: str, near: str | None) -> int:
        """1 when w is off the node `near` (the previous segment's; None: the first segment)."""
        return int(near is not None and self.node[w] != near)

    def best_plain(
        self, c: Chain, start: int, skip: set[str], near: str | None = None
    ) -> tuple | None:
        """(rank, worker, end) of the best worker not in `skip` holding nothing of c (every
        one that fits reaches as far: on the node `near` first)."""
        top = next((w for _, w in self.by_room if w not in skip), None)
        if top is None:
            return None
        costs = c.fresh_costs(start)
        room = self.room(top)
        k = bisect.bisect_right(costs, room)  # costs never decrease: segments of k positions fit
        if k == 0:
            return None
        need = costs[k - 1]
        for keys in (self.by_tie_at.get(near, ()) if near is not None else (), self.by_tie):
            for key in keys:
                w = key[2]
                if w not in skip and self.room(w) >= need:
                    rank = (-(start + k), self.cross(w, near), key[0], need, need, key[1], w)
                    return rank, w, start + k
        raise AssertionError("the worker with the most room fits")  # pragma: no cover

    def best(
        self,
        m: ModelInfo,
        start: int,
        exclude: set[str],
        touching: set[str],
        near: str | None = None,
    ) -> tuple | None:
        """(rank, worker, end) of the worker that takes the segment of m from `start`; `near`:
        the node of the replica's previous segment (module docstring)."""
        c = self.chain(m)
        best = self.best_plain(c, start, exclude | touching, near)
        whole = -len(c.at)
        for w in touching:
            if w in exclude:
                continue
            cross = self.cross(w, near)
            load = self.load_key(w)
            if best is not None and best[0][0] == whole and (cross, load) > best[0][1:3]:
                continue  # no reach beats the whole chain's, and it ranks after on (cross, load)
            end, new, churn = self.reach(w, c, start)
            if end == start:
                continue
            rank = (-end, cross, load, new, churn, len(self.covers[w]), w)
            if best is None or rank < best[0]:
                best = (rank, w, end)
        return best

    # -- changes ------------------------------------------------------------------------------
    def add(self, w: str, m: ModelInfo, start: int, end: int, share: float) -> None:
        """Place the segment [start, end) of m on w carrying `share` of the demand."""
        c = self.chain(m)
        self._unindex(w)
        cov = self.covers[w]
        name = m.name
        keys = list(zip(itertools.repeat(name), range(start, end)))
        if c.simple and cov.keys().isdisjoint(keys):
            self._add_simple(w, c, start, end, keys)
        else:
            self._add_each(w, c, start, end)
        self.load[w] += share * sum(c.work[start:end]) / c.total_work
        self._index(w)

    def _add_simple(self, w: str, c: Chain, start: int, end: int, keys: list) -> None:
        """`add` of a segment of a chain whose positions hold one block each, none twice, and
        that no segment of this model covers on w yet: the same counts from C-level maps."""
        held = self.held[w]
        seg = c.info.chain[start:end]
        new = [b for b in seg if b not in held]
        held.update(zip(seg, map(operator.add, map(held.get, seg, _ZEROS), _ONES), strict=True))
        self.covers[w].update(dict.fromkeys(keys, 1))
        for b in new:
            self.holders.setdefault(b, set()).add(w)
        self.used[w] += sum(map(c.size.get, new, _ZEROS))
        # decoder layers (positions 1..n-2) whose block w did not hold (_kv_new)
        layers = len(set(new).intersection(c.info.chain[max(1, start) : len(c.at) - 1]))
        if layers and c.info.kv_row_bytes > 0 and not self.kv_page[w]:
            self.kv_page[w] = 2 * KV_PAGE_TOKENS * c.info.kv_row_bytes
        self.kv_layers[w] += layers

    def _add_each(self, w: str, c: Chain, start: int, end: int) -> None:
        """`add`'s counts position by position (any chain)."""
        held = self.held[w]
        at, size, holders = c.at, c.size, self.holders
        last = len(at) - 1
        added: set[str] = set()  # blocks this segment brings (a layer's is new to w)
        layers = used = 0
        cov = self.covers[w]
        name = c.info.name
        for p in range(start, end):
            k = (name, p)
            cov[k] = cov.get(k, 0) + 1
            bs = at[p]
            if 1 <= p < last and (bs[0] not in held or bs[0] in added):
                layers += 1  # a decoder layer whose block w did not hold (_kv_new)
            for b in bs:
                if b not in held:
                    held[b] = 0
                    added.add(b)
                    used += size.get(b, 0)
                    holders.setdefault(b, set()).add(w)
                held[b] += 1
        self.used[w] += used
        if layers and c.info.kv_row_bytes > 0 and not self.kv_page[w]:
            self.kv_page[w] = 2 * KV_PAGE_TOKENS * c.info.kv_row_bytes
        self.kv_layers[w] += layers

    def remove(self, w: str, m: ModelInfo, start: int, end: int, share: float) -> None:
        """Undo `add` of the same segment (a block is freed when no segment uses it)."""
        c = self.chain(m)
        self._unindex(w)
        held = self.held[w]
        for p in range(start, end):
            if 1 <= p < len(c.at) - 1 and held.get(c.at[p][0]) == 1:
                self.kv_layers[w] -= 1  # the last segment using this layer's block
            for b in c.at[p]:
                held[b] -= 1
                if held[b] == 0:
                    del held[b]
                    self.used[w] -= c.nbytes(b)
                    self.holders[b].discard(w)
        self.load[w] = max(0.0, self.load[w] - share * sum(c.work[start:end]) / c.total_work)
        cov = self.covers[w]
        for p in range(start, end):
            k = (m.name, p)
            cov[k] -= 1
            if cov[k] == 0:
                del cov[k]
        self._index(w)

    def drop_worker(self, w: str) -> None:
        """Forget worker w (it is gone); its segments must have been removed or abandoned."""
        self._unindex(w)
        for b in self.held.pop(w):
            self.holders[b].discard(w)
        for b in self.workers[w].resident | self.workers[w].refused:
            self.resident_holders.get(b, set()).discard(w)
        del self.workers[w], self.used[w], self.load[w], self.covers[w]
        del self.kv_layers[w], self.kv_page[w], self.node[w]


def place_replica(
    cl: Cluster, m: ModelInfo, share: float, exclude: Iterable[str]
) -> list[Segment] | None:
    """Cut one replica of m's chain into the fewest segments that fit; None if none fits.
    The segments are added to the cluster."""
    segments = find_replica(cl, m, exclude)
    if segments is not None:
        for w, start, end in segments:
            cl.add(w, m, start, end, share)
    return segments


def find_replica(cl: Cluster, m: ModelInfo, exclude: Iterable[str]) -> list[Segment] | None:
    """The segments `place_replica` would add (the cluster is not changed)."""
    exclude = set(exclude)
    touching = cl.touching(cl.chain(m))
    segments: list[Segment] = []
    pos = 0
    near = None  # the node of the previous segment: the next one stays on it if it can
    while pos < len(m.chain):
        best = cl.best(m, pos, exclude, touching, near)
        if best is None:
            return None
        _, w, end = best
        segments.append((w, pos, end))
        near = cl.node[w]
        exclude.add(w)  # a replica visits a worker once
        pos = end
    return segments
