"""WorkerState: what the broker knows of one worker, and its credit (free slots, KV bytes).

Credit: the worker reports `free_slots` and `kv_free_bytes` in READY and every HEARTBEAT.
Between reports the broker counts what it dispatched or released since the last one, so a
burst of requests cannot overrun a worker that has not reported yet:
    credit = reported - (in flight now - in flight at the report).
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from blockllm.broker.protocol import Heartbeat, KVGeometryUse, Ready, StageRef

TIMINGS_MAX = 64  # names kept from a worker's heartbeat timings
_SEQ = itertools.count()  # ties in the timer heaps: first pushed first


def clean_timings(timings: Any) -> dict[str, float]:
    """A worker's timings as reported, keeping only name -> finite number (a few dozen)."""
    if not isinstance(timings, dict):
        return {}
    kept = {}
    for k, v in list(timings.items())[:TIMINGS_MAX]:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        if isinstance(k, str) and ok:
            kept[k] = v
    return kept


class Watched(dict):
    """A dict that calls `notify(key)` before every change (None: a change of several keys):
    the broker's worker registry (a `Registry`) and each worker's drains."""

    def __init__(self, *args: Any, notify: Any = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.notify = notify

    def _changed(self, key: Any) -> None:
        if self.notify is not None:
            self.notify(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._changed(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._changed(key)
        super().__delitem__(key)

    def pop(self, key: Any, *default: Any) -> Any:
        self._changed(key)
        return super().pop(key, *default)

    def popitem(self) -> Any:
        item = super().popitem()
        self._changed(item[0])
        return item

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._changed(key)
        return super().setdefault(key, default)

    def update(self, *args: Any, **kw: Any) -> None:
        for key in dict(*args, **kw):
            self._changed(key)
        super().update(*args, **kw)

    def clear(self) -> None:
        for key in list(self):
            self._changed(key)
        super().clear()


class Inflight(dict):
    """A worker's reservations (request id -> KV bytes): a removal calls `freed()` (its credit
    rose: waiting requests may have a route now, broker/waiting.py)."""

    def __init__(self, *args: Any, freed: Any = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.freed = freed

    def _gone(self) -> None:
        if self.freed is not None:
            self.freed()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._gone()

    def pop(self, key: Any, *default: Any) -> Any:
        had = key in self
        value = super().pop(key, *default)
        if had:
            self._gone()
        return value

    def popitem(self) -> Any:
        item = super().popitem()
        self._gone()
        return item

    def clear(self) -> None:
        had = bool(self)
        super().clear()
        if had:
            self._gone()


Timer = list[tuple[float, int, "WorkerState"]]  # a heap of (when, tie, worker)


class Registry(Watched):
    """The broker's workers by identity. `dirty` collects the identities whose stages or drains
    changed, or that joined or left, since the routing index (broker/stage_index.py) last
    looked: it is updated from those alone. `freed` collects those that may take more work
    (a reservation released, a report that raised their credit, a ban that ended) since the
    waiting requests (broker/waiting.py) last looked. `drains` holds those whose drains may
    end: their drains changed, or a stage being drained lost its last route
    (BrokerState.using); with those whose earliest drain deadline passed (`drain_timer`), the
    drain timer looks at them alone (`drains_to_check`, broker/commands.py).

    The broker's timer finds the workers whose ban ended, whose heartbeat expired or that are
    due a ping from heaps (`bans_ended`, `expired`, `pings_due`), not a scan of every worker:
    a worker has one entry in the expiry and the ping heaps, pushed again, later, when it is
    popped and not yet due (a message since moved its time), and one in the ban heap per ban."""

    def __init__(self) -> None:
        self.dirty: set[Any] = set()
        self.freed: set[Any] = set()
        self.drains: set[Any] = set()
        self.bans: Timer = []
        self._expiry: Timer = []
        self._pings: Timer = []
        self._drain_due: Timer = []
        self._drain_at: dict[Any, float] = {}  # worker -> its entry in _drain_due
        super().__init__(notify=self.dirty.add)

    def __setitem__(self, key: Any, value: Any) -> None:
        old = self.get(key)
        super().__setitem__(key, value)
        if isinstance(value, WorkerState):
            object.__setattr__(value, "watch", self.dirty)
            object.__setattr__(value, "freed", self.freed)
            object.__setattr__(value, "registry", self)
            if value is not old:  # a new registration: on the timers
                _push(self._expiry, value.expires_at, value)
                _push(self._pings, 0.0, value)
                if value.draining:
                    self.drains.add(key)

    def _current(self, w: WorkerState) -> bool:
        return self.get(w.identity) is w

    def bans_ended(self, now: float) -> list[WorkerState]:
        """The registered workers whose ban ended by `now` (`WorkerState.ban_ended` said so)."""
        out = []
        while self.bans and self.bans[0][0] <= now:
            w = heapq.heappop(self.bans)[2]
            if self._current(w) and w.ban_ended(now):
                out.append(w)
        return out

    def expired(self, now: float) -> list[WorkerState]:
        """The registered workers silent past their expiry (the caller loses them: they leave
        the timers)."""
        out = []
        while self._expiry and self._expiry[0][0] <= now:
            w = heapq.heappop(self._expiry)[2]
            if not self._current(w):
                continue
            if now >= w.expires_at:
                out.append(w)
            else:
                _push(self._expiry, w.expires_at, w)
        return out

    def pings_due(self, now: float, every: float) -> list[WorkerState]:
        """The registered workers neither heard from nor pinged for `every` seconds; they are
        due again `every` after now (the caller pings them and sets `last_ping`)."""
        out = []
        while self._pings and self._pings[0][0] <= now:
            w = heapq.heappop(self._pings)[2]
            if not self._current(w):
                continue
            due = max(w.last_recv, w.last_ping) + every
            if now >= due:
                out.append(w)
                due = now + every
            _push(self._pings, due, w)
        return out

    def drain_timer(self, w: WorkerState, when: float) -> None:
        """Look at `w`'s drains again at `when` (its earliest drain deadline)."""
        if self._drain_at.get(w.identity) != when:
            self._drain_at[w.identity] = when
            _push(self._drain_due, when, w)

    def drains_to_check(self, now: float) -> list[Any]:
        """The workers whose drains may end by `now` (`drains`, and those whose drain timer
        is due), by repr; the list is emptied."""
        due = self._drain_due
        while due and due[0][0] <= now:
            when, _, w = heapq.heappop(due)
            if self._drain_at.get(w.identity) == when:
                del self._drain_at[w.identity]
                if self._current(w):
                    self.drains.add(w.identity)
        out = sorted(self.drains, key=repr)
        self.drains.clear()
        return out


def _push(heap: Timer, when: float, w: WorkerState) -> None:
    heapq.heappush(heap, (when, next(_SEQ), w))


@dataclass(slots=True)
class WorkerState:
    """One registered worker (keyed by its ROUTER identity). Broker loop thread only."""

    identity: bytes
    name: str
    pid: int
    host: str
    device: str
    stages: tuple[StageRef, ...]
    expires_at: float
    registered_at: float
    kv_total_bytes: int = 0
    kv_free_bytes: int = 0
    free_slots: int = 0
    max_batch_size: int = 0
    queue_depths: dict[str, int] = field(default_factory=dict)
    rss_bytes: int = 0
    steps: int = 0
    step_ms_p50: float = 0.0
    step_ms_p95: float = 0.0
    mean_batch: float = 0.0
    last_recv: float = 0.0
    last_ping: float = 0.0
    # request id -> KV bytes reserved for it on this worker (estimate)
    inflight: dict[str, int] = field(default_factory=dict)
    base_inflight: int = 0
    base_reserved: int = 0
    banned_until: float = 0.0
    ban_count: int = 0
    # planner facts: memory budget (READY), weights held and per-stage batching (HEARTBEAT)
    memory_budget_bytes: int = 0
    weight_bytes: int = 0
    stage_batch_limits: dict[str, int] = field(default_factory=dict)
    stage_mean_batch: dict[str, float] = field(default_factory=dict)
    stage_adapters: dict[str, int] = field(default_factory=dict)
    stage_step_ms: dict[str, float] = field(default_factory=dict)
    # stage key -> when its drain ends: no new routes use it; then UNLOAD_STAGE is sent
    draining: dict[str, float] = field(default_factory=dict)
    last_error: str = ""
    # block ids the worker cannot get (READY): the planner places their stages elsewhere
    refused_blocks: tuple[str, ...] = ()
    pinned: tuple[str, ...] = ()  # stage keys configured by its operator (READY)
    # speculative execution counters (HEARTBEAT): speculated, accepted, rejected
    speculation: dict[str, int] = field(default_factory=dict)
    kv_geometries: tuple[KVGeometryUse, ...] = ()  # the KV arena per geometry (READY, HEARTBEAT)
    timings: dict[str, float] = field(default_factory=dict)  # HEARTBEAT (broker/timings.py)
    _pages: tuple = ()  # (label, page size, page bytes) of each geometry at the last report

    # the Registry's dirty set once registered: told when stages or drains change
    watch: set[Any] | None = field(default=None, repr=False, compare=False)
    # the Registry's freed set once registered: told when the worker may take more work
    freed: set[Any] | None = field(default=None, repr=False, compare=False)
    # the Registry once registered: its ban timer and the workers whose drains changed
    registry: Registry | None = field(default=None, repr=False, compare=False)
    # the keys of the live stages and the items queued, kept until the stages or queues change
    _keys: frozenset[str] | None = field(default=None, repr=False, compare=False)
    _dtypes: dict[str, str] | None = field(default=None, repr=False, compare=False)
    _queued: int = field(default=0, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "draining":
            value = Watched(value, notify=self._drains_changed)
            self._drains_changed()
        elif name == "inflight":
            value = Inflight(value, freed=self._credit_rose)
        if name == "stages":
            self._stages_changed()
        object.__setattr__(self, name, value)

    def _credit_rose(self) -> None:
        freed = getattr(self, "freed", None)
        if freed is not None:
            freed.add(self.identity)

    def _stages_changed(self, key: Any = None) -> None:
        object.__setattr__(self, "_keys", None)
        object.__setattr__(self, "_dtypes", None)
        watch = getattr(self, "watch", None)
        if watch is not None:
            watch.add(self.identity)

    def _drains_changed(self, key: Any = None) -> None:
        object.__setattr__(self, "_keys", None)  # the live stages changed (not the dtypes)
        watch = getattr(self, "watch", None)
        if watch is not None:
            watch.add(self.identity)
        registry = getattr(self, "registry", None)
        if registry is not None:
            registry.drains.add(self.identity)

    @classmethod
    def from_ready(cls, identity: bytes, msg: Ready, now: float, expiry_s: float) -> WorkerState:
        w = cls(
            identity=identity,
            name=msg.name,
            pid=msg.pid,
            host=msg.host,
            device=msg.device,
            stages=msg.stages,
            expires_at=now + expiry_s,
            registered_at=now,
            last_recv=now,
        )
        w.apply_ready(msg)
        return w

    def apply_ready(self, msg: Ready) -> None:
        """Take a (re-)READY's facts; the stage list is replaced."""
        self.name, self.pid, self.host, self.device = msg.name, msg.pid, msg.host, msg.device
        self.stages = msg.stages
        self.kv_total_bytes = msg.kv_total_bytes
        self.max_batch_size = msg.max_batch_size
        self.memory_budget_bytes = msg.memory_budget_bytes
        self.refused_blocks = msg.refused_blocks
        self.pinned = msg.pinned
        self.kv_geometries = msg.kv_geometries
        keys = self.stage_keys()
        self.draining = {k: t for k, t in self.draining.items() if k in keys}
        self._report(msg.free_slots, msg.kv_free_bytes)
        self._credit_rose()  # new facts (KV total, batch size): whatever waits may fit now

    def apply_heartbeat(self, msg: Heartbeat) -> None:
        self.queue_depths = dict(msg.queue_depths)
        self._queued = sum(v for v in self.queue_depths.values() if v > 0)
        self.rss_bytes = msg.rss_bytes
        self.steps = msg.steps
        self.step_ms_p50 = msg.step_ms_p50
        self.step_ms_p95 = msg.step_ms_p95
        self.mean_batch = msg.mean_batch
        self.weight_bytes = msg.weight_bytes
        self.stage_batch_limits = dict(msg.stage_batch_limits)
        self.stage_mean_batch = dict(msg.stage_mean_batch)
        self.stage_step_ms = dict(msg.stage_step_ms)
        self.stage_adapters = dict(msg.stage_adapters)
        self.kv_geometries = msg.kv_geometries
        self.timings = clean_timings(msg.timings)
        self.speculation = {
            "speculated": msg.speculated,
            "accepted": msg.accepted,
            "rejected": msg.rejected,
        }
        self._report(msg.free_slots, msg.kv_free_bytes)

    def _report(self, free_slots: int, kv_free_bytes: int) -> None:
        before = (self.credit_slots(), self.credit_bytes())
        self.free_slots = free_slots
        self.kv_free_bytes = kv_free_bytes
        self.base_inflight = len(self.inflight)
        self.base_reserved = sum(self.inflight.values())
        pages = tuple((g.label, g.page_size, g.page_bytes) for g in self.kv_geometries)
        after = (self.credit_slots(), self.credit_bytes())
        if any(b > a for a, b in zip(before, after, strict=True)) or pages != self._pages:
            self._credit_rose()  # a request waiting for this worker may fit now
        self._pages = pages

    def touch(self, now: float, expiry_s: float) -> None:
        """Any inbound message proves the worker alive."""
        self.last_recv = now
        self.expires_at = now + expiry_s

    # -- credit --------------------------------------------------------------------------
    def credit_slots(self) -> int:
        return self.free_slots - (len(self.inflight) - self.base_inflight)

    def credit_bytes(self) -> int:
        return self.kv_free_bytes - (sum(self.inflight.values()) - self.base_reserved)

    def can_take(self, kv_bytes: int) -> bool:
        """Whether one more request needing `kv_bytes` here fits its advertised credit.

        A worker that advertises no KV total (0) is limited by slots only.
        """
        if self.credit_slots() < 1:
            return False
        return self.kv_total_bytes <= 0 or self.credit_bytes() >= kv_bytes

    def load(self) -> float:
        """Busy fraction of its slots plus a small weight for queued work (lower is better)."""
        busy = len(self.inflight)
        capacity = busy + max(0, self.credit_slots())
        return (busy / capacity if capacity else 1.0) + 0.001 * self._queued

    # -- bans (CACHE_FULL / QUEUE_FULL back-off) -------------------------------------------
    def ban(self, now: float, base_s: float, max_s: float) -> float:
        """Exclude this worker from new routes for an exponentially growing while."""
        self.ban_count += 1
        seconds = min(max_s, base_s * 2 ** min(self.ban_count - 1, 30))
        self.banned_until = now + seconds
        if self.registry is not None:
            _push(self.registry.bans, self.banned_until, self)
        return seconds

    def banned(self, now: float) -> bool:
        return now < self.banned_until

    def ban_ended(self, now: float) -> bool:
        """Whether a ban ended by `now` (once per ban: the worker may take work again)."""
        if not self.banned_until or now < self.banned_until:
            return False
        self.banned_until = 0.0
        self._credit_rose()
        return True

    def stage_keys(self) -> frozenset[str]:
        return frozenset(s.key for s in self.stages)

    def dtypes(self) -> dict[str, str]:
        """Stage key -> the dtype it is served in (kept until the stages change)."""
        out = self._dtypes
        if out is None:
            out = {s.key: s.dtype for s in self.stages}
            object.__setattr__(self, "_dtypes", out)
        return out

    def live_keys(self) -> frozenset[str]:
        """The keys of `live_stages` (kept until the stages or the drains change)."""
        keys = self._keys
        if keys is None:
            keys = frozenset(s.key for s in self.live_stages())
            object.__setattr__(self, "_keys", keys)
        return keys

    def live_stages(self) -> tuple[StageRef, ...]:
        """The stages new routes may use: all but those being drained for an unload."""
        if not self.draining:
            return self.stages
        return tuple(s for s in self.stages if s.key not in self.draining)

    def drop_stages(self, keys: frozenset[str]) -> None:
        """Forget stages the worker said it does not host (UNKNOWN_STAGE); READY restores."""
        self.stages = tuple(s for s in self.stages if s.key not in keys)
