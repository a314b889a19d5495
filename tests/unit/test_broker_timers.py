"""The broker's timers find what is due from heaps, not scans of every request or worker: the
requests past their deadline (BrokerState.past_deadline), the decode hops late enough to hedge
(Hedging.tick over BrokerState.sent; hedges promote, replace and release routes, whose counts
per route `BrokerState.running` keeps), the workers whose ban ended, whose heartbeat expired or
that are due a ping (workers.Registry), the drains to finish (Commands.tick over
Registry.drains). Pinned to the scans they replace on random traces."""

from __future__ import annotations

import random
from collections import Counter

from blockllm.broker.protocol import Error, Forward, Heartbeat, Result, UnloadStage
from blockllm.broker.requests import split_wire_id
from blockllm.broker.rewire import signature
from blockllm.zoo.chain import stage_key
from tests.unit.broker_harness import BASE, CLIENT, W0, W1, W2, Harness


def test_deadlines_and_hedges_from_heaps_equal_the_scans() -> None:
    rng = random.Random(7)
    h = Harness(hedge_after_s=0.3)
    for w in (W0, W1, W2):
        h.ready(w, [("base", 0, 6)], slots=6)
    b = h.broker
    launched: list[str] = []
    launch = b.hedging._launch

    def spy(req, now):  # the requests the hedge timer looked at: the scan's set
        launched.append(req.rid)
        return launch(req, now)

    b.hedging._launch = spy
    pending: list[tuple[bytes, Forward]] = []
    n = 0

    def keep(outs) -> None:
        pending.extend((o.peer, o.msg) for o in outs if isinstance(o.msg, Forward))

    timeouts = hedges = 0
    for _ in range(400):
        r = rng.random()
        if r < 0.25:
            n += 1
            keep(
                h.generate(f"c{n}", max_new_tokens=rng.randint(2, 6), timeout_s=rng.uniform(0.5, 3))
            )
        elif r < 0.6 and pending:
            peer, fwd = pending.pop(rng.randrange(len(pending)))
            if rng.random() < 0.8:  # the others stay unanswered: late, then hedged
                keep(h.send(peer, Result(fwd.request_id, fwd.step, token_id=40)))
        else:
            h.now += rng.uniform(0.0, 0.25)
            s = b.state
            due = {q.rid for q in s.requests.values() if h.now >= q.deadline}
            limit = b.hedging.hedge_deadline()
            late = {
                q.rid
                for q in s.requests.values()
                if q.rid not in due
                and q.route is not None
                and q.shadow is None
                and not q.prefill
                and q.past_len != 0
                and h.now - q.hop_sent_at >= limit
            }
            by_client = {q.client_rid: q.rid for q in s.requests.values()}
            running: dict = {}  # the requests per route the planned routes are chosen by
            for q in s.requests.values():
                if q.route:
                    running.setdefault(q.model, Counter())[signature(q.route)] += 1
            assert s.running == running
            launched.clear()
            outs = h.tick()
            failed = {
                by_client[o.msg.request_id]
                for o in outs
                if o.peer == CLIENT and isinstance(o.msg, Error)
            }
            assert failed == due
            assert sorted(launched) == sorted(late)
            timeouts += len(due)
            hedges += len(late)
            keep(outs)
    assert timeouts > 5 and hedges > 5  # the trace exercised both timers
    assert len(b.state.deadlines) <= 2 * len(b.state.requests) + 64


def test_worker_bans_expiries_pings_and_drains_from_heaps_equal_the_scans() -> None:
    rng = random.Random(11)
    h = Harness(heartbeat_s=1.0, liveness=3, ban_base_s=0.3, ban_max_s=2.0)
    b = h.broker
    names = [f"w{i:02d}".encode() for i in range(12)]
    expired = pinged = drained = bans = 0
    for _ in range(600):
        r = rng.random()
        peer = rng.choice(names)
        w = b.workers.get(peer)
        if r < 0.15 and w is None:  # a worker (re-)registers
            h.ready(peer, [("base", 0, 3), ("base", 3, 6)])
        elif r < 0.45 and w is not None:  # any message proves it alive
            h.send(peer, Heartbeat())
        elif r < 0.55 and w is not None:
            w.ban(h.now, h.cfg.ban_base_s, h.cfg.ban_max_s)
            bans += 1
        elif r < 0.6 and w is not None and w.stages:
            w.draining[rng.choice(w.stages).key] = h.now + rng.uniform(0, 1)
        else:
            h.now += rng.uniform(0.0, 0.4)
            live = list(b.workers.values())
            want_ended = {w.identity for w in live if w.banned_until and h.now >= w.banned_until}
            want_expired = {w.identity for w in live if h.now >= w.expires_at}
            limit = h.cfg.heartbeat_s
            want_pinged = {
                w.identity
                for w in live
                if w.identity not in want_expired
                and h.now - w.last_recv >= limit
                and h.now - w.last_ping >= limit
            }
            want_drained = {  # no request runs: every drain ends at the next tick
                (w.identity, k) for w in live if w.identity not in want_expired for k in w.draining
            }
            bans_before = {w.identity: w.banned_until for w in live}
            outs = h.tick()
            for p, until in bans_before.items():
                if p in b.workers:
                    assert b.workers[p].banned_until == (0.0 if p in want_ended else until)
            assert set(b.workers) == set(bans_before) - want_expired  # the expired, only
            assert {o.peer for o in outs if isinstance(o.msg, Heartbeat)} == want_pinged
            unloads = {(o.peer, o.msg.key) for o in outs if isinstance(o.msg, UnloadStage)}
            assert unloads == want_drained
            expired += len(want_expired)
            pinged += len(want_pinged)
            drained += len(want_drained)
    assert expired > 5 and pinged > 20 and drained > 5 and bans > 10  # every timer fired


def _drains_by_scan(b, now: float) -> set[tuple[bytes, str]]:
    """The drains the timer ends at `now`, found as before: every pending drain of every
    worker, used while a request whose reservation is on the worker runs its stage there;
    (worker, key, whether it ends before its deadline)."""
    out = set()
    for w in b.workers.values():
        running = b.state.requests_on(w.identity)
        for key, deadline in w.draining.items():
            used = any(
                h.worker == w.identity and key in h.stage_keys
                for r in running
                for h in r.route or ()
            )
            if not used or now >= deadline:
                out.add((w.identity, key, now < deadline))
    return out


def test_drains_end_when_their_stage_is_unused_or_their_time_is_up_as_the_scan_said() -> None:
    """Requests run on stages being drained; at every tick the drains that end are the ones
    the scan of every pending drain (and every request on the worker) ends, while the timer
    looks only at the workers whose drains, or the routes on a drained stage, changed, or
    whose deadline passed; `BrokerState.using` equals the count over the routes."""
    rng = random.Random(23)
    h = Harness(hedge_after_s=0.0)
    b = h.broker
    names = [f"w{i}".encode() for i in range(6)]
    spans = {
        p: [("base", 0, 3), ("base", 3, 6)] if i % 2 else [("base", 0, 6)]
        for i, p in enumerate(names)
    }
    for p in names:
        h.ready(p, spans[p], slots=4)
    want: set = set()
    looked: list[int] = []
    tick, to_check = b.commands.tick, b.workers.drains_to_check

    def spy_tick(now):
        want.clear()
        want.update(_drains_by_scan(b, now))
        return tick(now)

    def spy_check(now):
        out = to_check(now)
        looked.append(len(out))
        return out

    b.commands.tick = spy_tick
    b.workers.drains_to_check = spy_check
    pending: list[tuple[bytes, Forward]] = []
    n = ended = unused = pending_drain_ticks = 0

    def keep(outs) -> None:
        pending.extend((o.peer, o.msg) for o in outs if isinstance(o.msg, Forward))
        for o in outs:  # the worker drops an unloaded stage and says so
            if isinstance(o.msg, UnloadStage) and o.peer in b.workers:
                spans[o.peer] = [s for s in spans[o.peer] if _key(s) != o.msg.key]
                keep(h.ready(o.peer, spans[o.peer], slots=4))

    for _ in range(1500):
        r = rng.random()
        if r < 0.1:
            n += 1
            keep(h.generate(f"c{n}", max_new_tokens=rng.randint(2, 12), timeout_s=60))
        elif r < 0.6 and pending:
            peer, fwd = pending.pop(rng.randrange(len(pending)))
            req = b.state.requests.get(split_wire_id(fwd.request_id)[0])
            if req is not None and req.route and req.hop < len(req.route) - 1:
                keep(h.hidden(peer, fwd)[0])
            else:
                keep(h.token(peer, fwd, 40))
        elif r < 0.7:  # the planner drains a stage (or loads one back, which ends its drain)
            peer = rng.choice(names)
            if rng.random() < 0.15 or not spans[peer]:
                spans[peer] = (
                    [("base", 0, 3), ("base", 3, 6)] if rng.random() < 0.5 else [("base", 0, 6)]
                )
                keep(h.ready(peer, spans[peer], slots=4))
            else:
                key = _key(rng.choice(spans[peer]))
                msg = UnloadStage(key, peer.decode(), f"u{n}", rng.choice((0.5, 5.0, 60.0)))
                keep(h.send(b"planner", msg))
        else:
            h.now += rng.uniform(0.0, 0.3)
            pending_drain_ticks += sum(1 for w in b.workers.values() if w.draining)
            outs = h.tick()
            unloads = {(o.peer, o.msg.key) for o in outs if isinstance(o.msg, UnloadStage)}
            assert unloads == {(peer, key) for peer, key, _ in want}
            ended += len(want)
            unused += sum(early for _, _, early in want)
            keep(outs)
        using: Counter = Counter()
        for q in b.state.requests.values():
            for hop in q.route or ():
                for key in hop.stage_keys:
                    using[(hop.worker, key)] += 1
        assert b.state.using == dict(using)

    assert unused > 20 and ended > unused  # drains ended unused, and at their deadline
    assert sum(looked) < pending_drain_ticks / 2  # not every pending drain at every tick


def _key(span: tuple[str, int, int]) -> str:
    return stage_key(BASE, span[1], span[2])
