"""Speculative execution on the worker process: the SPECULATE handler and the engine calls of
a worker that speculates (compute thread only).

The broker, for a model given a speculation tolerance, sends a decode step's input both to the
hop it is meant for (FORWARD) and, as a prediction, to the next hop's worker (SPECULATE, the
same frames). Here that prediction runs early through `worker/speculate.py`'s `Speculation`
(created on the first SPECULATE; until then the worker runs its engine directly, exactly as
without this module). The real FORWARD then goes through `Speculation.submit`: answered from
the kept run when its input is within the message's tolerance (at once: no step needed), else
the speculative KV write is rolled back and the hop runs as usual. A SPECULATE is never
answered: one that cannot run (unknown stage, queue full, shutting down) is dropped, and the
real FORWARD runs as without speculation.

Registered in `WorkerProc._handlers` (worker/proc.py) as
`functools.partial(handle_speculate, self)`; `submit`, `step` and `release` stand in for the
engine's in `WorkerProc`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from blockllm.broker.protocol import Speculate
from blockllm.worker.errors import WorkerError
from blockllm.worker.items import SamplingParams, WorkItem, WorkResult
from blockllm.worker.speculate import Speculation

logger = logging.getLogger(__name__)


def speculation(proc: Any) -> Speculation:
    """The process's `Speculation` (made on first use; its counters go into the facts)."""
    if proc.spec is None:
        proc.spec = Speculation(proc.engine, tolerance=0.0)
        proc.facts.spec = proc.spec
    return proc.spec


def handle_speculate(proc: Any, msg: Speculate, tensors: list[torch.Tensor]) -> None:
    """Start the hop on the predicted input; keep the result for the real FORWARD."""
    if proc.stop_requested or len(tensors) != 1 or not msg.tolerance >= 0:
        return
    x = tensors[0] if proc.cfg.device == "cpu" else tensors[0].to(proc.cfg.device)
    item = WorkItem(
        request_id=msg.request_id,
        step=msg.step,
        stage_keys=tuple(msg.stage_keys),
        past_len=msg.past_len,
        hidden=x,
        max_total_len=msg.max_total_len,
        sampling=SamplingParams(msg.temperature, msg.top_k, msg.top_p, msg.seed),
        top_logprobs=msg.top_logprobs,
    )
    spec = speculation(proc)
    try:
        spec.speculate(item, tolerance=msg.tolerance)
    except WorkerError as e:  # best effort: the real FORWARD runs as without speculation
        logger.debug("[speculate] %s step %d dropped: %s", msg.request_id, msg.step, e.message)
        return
    except Exception:
        logger.exception("[speculate] %s step %d failed", msg.request_id, msg.step)
        return
    proc._known.add(msg.request_id)


def submit(proc: Any, item: WorkItem) -> None:
    """The real input of a step: through `Speculation` once the worker speculates (an
    accepted one is answered here and now). Raises what `Worker.submit` raises."""
    if proc.spec is None:
        proc.engine.submit(item)
        return
    if proc.spec.submit(item) == "accepted":
        for r in proc.spec.take_ready():
            proc._answer(r)


def step(proc: Any) -> list[WorkResult]:
    """One engine step (speculative results kept back, not answered)."""
    return proc.engine.step() if proc.spec is None else proc.spec.step()


def release(proc: Any, request_id: str) -> None:
    """Forget a request: its KV, queued items and any speculative run."""
    if proc.spec is None:
        proc.engine.release(request_id)
    else:
        proc.spec.release(request_id)
