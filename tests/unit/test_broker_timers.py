"""The broker's timers find what is due from heaps, not scans of every request: the requests
past their deadline (BrokerState.past_deadline) and the decode hops late enough to hedge
(Hedging.tick over BrokerState.sent). Pinned to the scans they replace on a random trace."""

from __future__ import annotations

import random

from blockllm.broker.protocol import Error, Forward, Result
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
