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
from blockllm.broker.rewire import signature
from tests.unit.broker_harness import CLIENT, W0, W1, W2, Harness


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
