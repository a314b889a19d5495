"""The broker loop's STATS: a snapshot is built on one turn of the loop and encoded over the
turns after it, at most about `BrokerConfig.stats_turn_s` of encoding per turn, the loop
routing in between; its messages go out on the turn that finishes them (a full snapshot in
parts: all its parts on that turn). At 2,020 models on 256 workers a full STATS packs ~1 MB of
changed entries (300-400 ms on this machine's loaded cores: what the loop used to stall for
in one turn); now no turn of STATS work is longer than the body's build or the budget
(broker/stats_delta.py `Encoding`). The next snapshot is built only once this one is out.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import zmq

from blockllm.broker.config import BrokerConfig
from blockllm.broker.stats_delta import DeltaPublisher, Encoding

logger = logging.getLogger(__name__)


class StatsSender:
    """One per BrokerProc, on its loop thread: `build(now)` when a snapshot is due (not
    while `busy`), `turn()` on every turn while `busy` (the loop polls without waiting
    meanwhile). Dropped, never queued, when nobody keeps up (the PUB socket)."""

    def __init__(self, cfg: BrokerConfig, broker: Any, pub: zmq.Socket) -> None:
        self.cfg = cfg
        self.broker = broker
        self.pub = pub
        self.seq = 0
        self._deltas = DeltaPublisher(cfg.stats_full_every)
        self._encoding: Encoding | None = None

    @property
    def busy(self) -> bool:
        """A snapshot is being encoded (call `turn`)."""
        return self._encoding is not None

    def build(self, now: float) -> None:
        """Build the snapshot (this turn's STATS work); its encoding starts next turn."""
        assert self._encoding is None, "the previous snapshot is not out yet"
        self.seq += 1
        try:
            body = self.broker.stats(now)
            self._encoding = self._deltas.start(self.seq, body)
        except Exception:  # a stats bug must not take the broker down
            self._failed("cannot build the stats snapshot")

    def turn(self) -> None:
        """Encode for about `stats_turn_s`; send the messages once they are all encoded."""
        assert self._encoding is not None
        try:
            messages = self._encoding.step(self.cfg.stats_turn_s or None)
        except Exception:
            self._failed("cannot encode the stats snapshot")
            return
        if messages is None:
            return
        self._encoding = None
        for _msg, wire in messages:
            with contextlib.suppress(zmq.Again):
                self.pub.send_multipart(wire, flags=zmq.NOBLOCK)

    def _failed(self, what: str) -> None:
        """Count and log it; the next snapshot is a full one (an encoding stopped half way
        may have moved the base its subscribers never got)."""
        logger.exception(what)
        self.broker.counters["internal_errors"] += 1
        self._encoding = None
        self._deltas = DeltaPublisher(self.cfg.stats_full_every)
