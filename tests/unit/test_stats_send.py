"""The broker loop's STATS (broker/stats_send.py) over a real PUB/SUB pair: a snapshot is built
on one turn and encoded over the turns after it; nothing goes out before its last turn, then
all of it (a full snapshot's parts together), and a subscriber rebuilds the body the broker
built, however the broker changed meanwhile."""

from __future__ import annotations

import time

import pytest
import zmq

from blockllm.broker import frames, stats_delta
from blockllm.broker.protocol import Heartbeat, Stats
from blockllm.broker.stats_delta import StatsView
from blockllm.broker.stats_send import StatsSender
from tests.unit.broker_harness import W0, W1, W2, Harness

ENDPOINT = "inproc://test-stats-send"


@pytest.fixture
def pubsub():
    ctx = zmq.Context()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    pub.bind(ENDPOINT)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(ENDPOINT)
    deadline = time.monotonic() + 10  # the subscription reaches the PUB socket
    while not sub.poll(10):
        assert time.monotonic() < deadline, "the subscriber never connected"
        pub.send(b"probe")
    while sub.poll(0):
        sub.recv_multipart()
    yield pub, sub
    pub.close(0)
    sub.close(0)
    ctx.term()


def test_a_snapshot_goes_out_whole_on_the_turn_that_finishes_it(pubsub, monkeypatch) -> None:
    pub, sub = pubsub
    monkeypatch.setattr(stats_delta, "STEP_ENTRIES", 1)  # an entry per turn at most
    h = Harness(stats_turn_s=1e-9, stats_full_every=2)
    for peer in (W0, W1, W2):
        h.ready(peer, [("base", 0, 6), ("ft", 0, 6)])
    sender = StatsSender(h.cfg, h.broker, pub)
    sender._deltas.part_bytes = 600  # a full snapshot in parts
    view = StatsView()
    kinds = []
    for _ in range(4):
        h.now += 0.5
        body_now = h.broker.stats(h.now)  # what the next build gives (entries kept)
        want = frames.decode(frames.encode(Stats(sender.seq + 1, body_now)))[0].body
        sender.build(h.now)
        turns = 0
        while sender.busy:
            assert not sub.poll(0), "a message went out before its snapshot was encoded"
            sender.turn()
            turns += 1
            h.send(W1, Heartbeat(free_slots=turns % 7, steps=turns))  # the loop goes on
        assert turns > 3  # 3 workers and 2 models, an entry per turn, then the end
        assert sub.poll(1000)
        msgs = [frames.decode(sub.recv_multipart())[0]]
        while sub.poll(0):
            msgs.append(frames.decode(sub.recv_multipart())[0])
        kinds.append(len(msgs) if isinstance(msgs[0], Stats) else 0)
        got = None
        for m in msgs:
            got = view.full(m) if isinstance(m, Stats) else view.apply(m)
        assert got == want
    assert kinds[0] > 1 and kinds[2] > 1 and kinds[1] == kinds[3] == 0  # parts; deltas
