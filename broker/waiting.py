"""The broker's waiting requests: in arrival order, indexed by model, and retried only when
something that could give them a route changed.

A request without a route waits. Retrying every waiting request after every message costs
each routed message a route attempt per waiting model (hundreds when many tenants wait for
credit or coverage). Instead, a model whose requests found no route is **blocked** on the
workers that serve stages of it (the routing index's edges), and is tried again (**woken**)
only when:
- a request of it arrives or is put back (GENERATE, replay, move);
- one of those workers may take more work: a reservation was released, or a report (READY,
  HEARTBEAT) raised its credit, or its ban ended (`workers.Registry.freed`);
- the stages that could serve it changed (the routing index dropped its edges: a worker's
  stages or drains changed, it joined or left, the models' keys changed), or the planner's
  routes did (every model).
`RequestFlow.dispatch` (broker/flow.py) takes the woken models' requests in arrival order.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator


class WaitQueue:
    """Request ids without a route (module docstring). The broker's loop thread only.

    Reads like the deque it replaces (`len`, `in`, iteration in arrival order, `append`,
    `appendleft`, `remove`); `model_of(rid)` names a queued request's model.
    """

    def __init__(self, model_of: Callable[[str], str]) -> None:
        self.model_of = model_of
        self._seq = itertools.count(1)
        self._front = 0  # appendleft: ever smaller numbers
        self._at: dict[str, tuple[int, str]] = {}  # rid -> (arrival number, model)
        self._by_model: dict[str, deque[tuple[int, str]]] = {}  # arrival order per model
        self._ready: set[str] = set()  # models to try at the next dispatch
        self._blocked_on: dict[str, frozenset[Hashable]] = {}  # model -> workers it waits on
        self._waiters: dict[Hashable, set[str]] = {}  # worker -> models blocked on it

    # -- the deque's reading side -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._at)

    def __bool__(self) -> bool:
        return bool(self._at)

    def __contains__(self, rid: object) -> bool:
        return rid in self._at

    def __iter__(self) -> Iterator[str]:
        return iter([rid for _, rid in sorted((seq, rid) for rid, (seq, _) in self._at.items())])

    # -- queueing -----------------------------------------------------------------------------
    def append(self, rid: str) -> None:
        """Queue a request behind the others (a new one); its model is woken."""
        self._put(rid, next(self._seq), last=True)

    def appendleft(self, rid: str) -> None:
        """Queue a request ahead of the others (replayed or moved); its model is woken."""
        self._front -= 1
        self._put(rid, self._front, last=False)

    def _put(self, rid: str, seq: int, last: bool) -> None:
        if rid in self._at:
            self.remove(rid)
        model = self.model_of(rid)
        self._at[rid] = (seq, model)
        q = self._by_model.setdefault(model, deque())
        q.append((seq, rid)) if last else q.appendleft((seq, rid))
        self.wake(model)

    def remove(self, rid: str) -> None:
        """Forget a queued request (started, finished or failed); ValueError if not queued."""
        if rid not in self._at:
            raise ValueError(f"{rid!r} is not waiting")
        seq, model = self._at.pop(rid)
        q = self._by_model[model]
        q.remove((seq, rid))
        if not q:
            del self._by_model[model]
            self._unblock(model)
            self._ready.discard(model)

    # -- waking -------------------------------------------------------------------------------
    def wake(self, model: str) -> None:
        """Try `model`'s requests at the next dispatch."""
        if model in self._by_model:
            self._unblock(model)
            self._ready.add(model)

    def wake_workers(self, peers: Iterable[Hashable]) -> None:
        """Workers that may take more work: wake the models blocked on them."""
        for peer in peers:
            for model in list(self._waiters.get(peer, ())):
                self.wake(model)

    def wake_all(self) -> None:
        for model in list(self._by_model):
            self.wake(model)

    def block(self, model: str, peers: Iterable[Hashable]) -> None:
        """`model`'s requests found no route: wait until a change wakes it (module docstring);
        `peers` are the workers serving its stages."""
        if model not in self._by_model or model in self._ready:
            return  # gone, or woken again since its requests were taken: tried next time
        self._unblock(model)
        on = self._blocked_on[model] = frozenset(peers)
        for peer in on:
            self._waiters.setdefault(peer, set()).add(model)

    def _unblock(self, model: str) -> None:
        for peer in self._blocked_on.pop(model, ()):
            models = self._waiters.get(peer)
            if models is not None:
                models.discard(model)
                if not models:
                    del self._waiters[peer]

    def take_ready(self) -> list[str]:
        """The requests of the woken models, in arrival order; none is woken after."""
        ready, self._ready = self._ready, set()
        queues = [self._by_model[m] for m in sorted(ready) if m in self._by_model]
        if len(queues) == 1:
            return [rid for _, rid in queues[0]]
        return [rid for _, rid in heapq.merge(*queues)]

    def blocked(self) -> dict[str, frozenset[Hashable]]:
        """Model -> the workers it is blocked on (for tests and STATUS)."""
        return dict(self._blocked_on)
