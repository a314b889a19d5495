"""Speculative stage runs (the paper's "speculative execution"): a hop starts on a predicted
input before its real input arrives, and the result is kept when the prediction was close.

While stage k runs a decode step on another worker, stage k+1 (this hop) may run the same
step on a *predicted* input, stage k's own input: the residual stream moves little per block.
`Speculation` wraps a `Worker` (no sockets, compute thread only, like the Worker):

- `speculate(item)`: a single-token decode item carrying the prediction is submitted like any
  other (it is batched with real work); its result is kept, not returned.
- `submit(item)`: the real input for that (request, step). If the speculative run finished and
  `||real - predicted|| / ||real|| <= tolerance`, the kept result is returned by the next
  `step()` without running the hop again (*accepted*). The KV of that position: the first
  decoder layer's K/V are rewritten from the real input (one layer on one token); the deeper
  layers keep the K/V of the speculative pass (exact only when the inputs are equal, so
  tolerance 0 reproduces exact serving). Otherwise (*rejected*) the request's KV length is
  rolled back to `past_len` in every stage of the hop and the real item runs as usual,
  overwriting that position in every layer. A speculative item still queued when the real
  input arrives is withdrawn (*overtaken*); one that failed is forgotten and the real item
  runs normally.

Counters: `stats()`. See docs/internals.md, "Speculative execution".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from blockllm.worker.attention import plan_step
from blockllm.worker.errors import BadRequest
from blockllm.worker.items import WorkItem, WorkResult
from blockllm.worker.worker import Worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SpeculationStats:
    speculated: int = 0  # speculative items submitted
    accepted: int = 0  # real inputs answered from a kept result
    rejected: int = 0  # real inputs out of tolerance: the hop reran
    overtaken: int = 0  # real input arrived before the speculative run: withdrawn
    failed: int = 0  # speculative runs that came back with an error
    rewrite_s: float = 0.0  # time spent rewriting first-layer KV of accepted steps


@dataclass(slots=True)
class _Kept:
    """One speculative run: its prediction ([1, D], device) and, once run, its result."""

    item: WorkItem
    prediction: torch.Tensor
    tolerance: float
    result: WorkResult | None = None


def relative_distance(real: torch.Tensor, predicted: torch.Tensor) -> float:
    """||real - predicted|| / ||real|| in float32 (0 when both are zero)."""
    r, p = real.float(), predicted.float()
    norm = float(torch.linalg.vector_norm(r))
    diff = float(torch.linalg.vector_norm(r - p))
    return diff / norm if norm > 0 else diff


class Speculation:
    """Speculative runs on one Worker; call its `submit`, `step()` and `release` instead of the
    worker's. With `on_accept`, an accepted result is handed to it at once (a worker process
    answers it without waiting for a step); else the next `step()` returns it."""

    def __init__(
        self,
        worker: Worker,
        tolerance: float,
        on_accept: Callable[[WorkResult], None] | None = None,
    ) -> None:
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
        self.worker = worker
        self.on_accept = on_accept
        self.tolerance = float(tolerance)
        self._kept: dict[str, _Kept] = {}  # request id -> its speculative run
        self._ready: list[WorkResult] = []  # accepted results, returned by the next step()
        self._n = dict.fromkeys(("speculated", "accepted", "rejected", "overtaken", "failed"), 0)
        self._rewrite_s = 0.0
        self.last_distance: float | None = None  # of the latest real input checked

    # -- the two inputs ------------------------------------------------------------------
    def speculate(self, item: WorkItem, tolerance: float | None = None) -> None:
        """Run `item` (hidden = the predicted input [1, D], past_len > 0) speculatively; its
        real input is checked against `tolerance` (default: the one given at construction).

        Raises BadRequest (not a single-token hidden decode, or the request already has a
        speculation), and what `Worker.submit` raises."""
        h = item.hidden
        if h is None or h.dim() != 2 or h.shape[0] != 1 or item.past_len < 1:
            raise BadRequest("speculation runs single-token decode steps on hidden states")
        if item.request_id in self._kept:
            raise BadRequest(f"request {item.request_id!r} already has a speculative run")
        tol = self.tolerance if tolerance is None else float(tolerance)
        if not tol >= 0:
            raise BadRequest(f"tolerance must be >= 0, got {tol!r}")
        self.worker.submit(item)
        self._kept[item.request_id] = _Kept(item, h, tol)
        self._n["speculated"] += 1

    def submit(self, item: WorkItem) -> str:
        """The real input of a step: answer it from a kept speculative run or run it.

        Returns "accepted", "rejected", "overtaken" or "exact" (no speculation to match).
        Raises what `Worker.submit` raises."""
        kept = self._kept.pop(item.request_id, None)
        if kept is None:
            self.worker.submit(item)
            return "exact"
        if not self._matches(kept.item, item):
            # a different step (replay, restart): the speculative KV write is stale
            self._rollback(kept.item)
            self.worker.submit(item)
            return "exact"
        if kept.result is None:  # still queued: the real input overtook it
            self.worker.withdraw(item.request_id)
            self._n["overtaken"] += 1
            self.worker.submit(item)
            return "overtaken"
        if kept.result.error is not None:
            self._n["failed"] += 1
            self.worker.submit(item)
            return "exact"
        assert item.hidden is not None
        real = item.hidden.to(kept.prediction.device)
        self.last_distance = relative_distance(real, kept.prediction)
        if self.last_distance <= kept.tolerance:
            self._rewrite_first_layer(item)
            self._n["accepted"] += 1
            if self.on_accept is not None:
                self.on_accept(kept.result)
            else:
                self._ready.append(kept.result)
            return "accepted"
        self._rollback(item)
        self._n["rejected"] += 1
        self.worker.submit(item)
        return "rejected"

    def step(self, limit: int | None = None) -> list[WorkResult]:
        """`Worker.step()`, minus speculative results (kept), plus accepted ones."""
        results, self._ready = self._ready, []
        for r in self.worker.step(limit):
            kept = self._kept.get(r.request_id)
            if kept is not None and kept.result is None and kept.item.step == r.step:
                kept.result = r
            else:
                results.append(r)
        return results

    def release(self, request_id: str) -> None:
        """Forget a request (with `Worker.release`)."""
        self._kept.pop(request_id, None)
        self.worker.release(request_id)

    def stats(self) -> SpeculationStats:
        return SpeculationStats(**self._n, rewrite_s=self._rewrite_s)

    # -- KV ------------------------------------------------------------------------------
    @staticmethod
    def _matches(spec: WorkItem, real: WorkItem) -> bool:
        return (
            spec.step == real.step
            and spec.past_len == real.past_len
            and spec.stage_keys == real.stage_keys
            and real.hidden is not None
            and tuple(real.hidden.shape) == tuple(spec.hidden.shape)  # type: ignore[union-attr]
        )

    def _rollback(self, item: WorkItem) -> None:
        """Back to `past_len` tokens in every stage of the hop: the next run overwrites."""
        self.worker.withdraw(item.request_id)
        for key in item.stage_keys:
            seq = self.worker.kv.get(key, item.request_id)
            if seq is not None and seq.length > item.past_len:
                seq.length = item.past_len

    def _rewrite_first_layer(self, item: WorkItem) -> None:
        """K/V of the hop's first decoder layer at position past_len, from the real input."""
        t0 = time.perf_counter()
        assert item.hidden is not None
        for key in item.stage_keys:
            model = self.worker.stage_model(key)
            if not model.layers:
                continue
            seq = self.worker.kv.get(key, item.request_id)
            assert seq is not None, "the speculative run wrote KV here"
            pool = seq.pool
            # the first layer's page table only: [L, P] -> [1, P]
            plan = plan_step(pool, model.layer0, 1, [(seq.pages[:1], item.past_len, 1)])
            x = item.hidden.to(model.device, model.dtype)  # [1, D]
            with torch.inference_mode():
                model.run_layers(x, plan, count=1)  # writes that layer's K/V
            break
        self._rewrite_s += time.perf_counter() - t0
