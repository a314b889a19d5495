"""LoRA adapter blocks read off the compute thread: a FORWARD waits, not the batch.

A FORWARD naming adapter blocks the engine does not hold is parked here and its missing blocks
go to the loader thread as one `AdapterJob` (read from the zoo and hash-verified there; fetched
from the broker first when the worker pulls its blocks: worker/fetch.py `fetch_blocks`). Blocks
already on their way are not asked for twice. When the loader's `Loaded` comes back through the
inbox, its blocks become resident (`AdapterCache.insert`, compute thread) and every parked
FORWARD whose blocks are now all resident is submitted as if it had just arrived; those needing
a block the job could not give are refused. Meanwhile the compute loop keeps stepping every
other request. RELEASE of a parked request drops it; a reset drops them all.

Compute-thread only (the loader thread only runs the job).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from blockllm.broker.protocol import ErrorCode, Forward
from blockllm.worker.loader import AdapterJob, Loaded, LoaderBusy
from blockllm.worker.lora import AdapterCache

Refuse = Callable[[Forward, ErrorCode, str, bool], None]  # (msg, code, message, retryable)
Forwarder = Callable[[Forward, list[torch.Tensor]], None]


class TooManyWaiting(RuntimeError):
    """More FORWARDs wait for adapter blocks than `limit`: the sender should retry later."""


@dataclass(slots=True)
class _Parked:
    msg: Forward
    tensors: list[torch.Tensor]
    missing: set[str]


class AdapterLoads:
    """Parked FORWARDs by arrival and the adapter blocks being loaded for them."""

    def __init__(
        self,
        cache: AdapterCache | None,
        submit: Callable[[AdapterJob], None],
        dtype: Callable[[], str],
        limit: int = 256,
    ) -> None:
        self._cache = cache  # None: off (the engine reads adapter blocks itself)
        self._submit = submit  # StageLoader.submit (raises LoaderBusy)
        self._dtype = dtype  # the dtype the engine reads adapter blocks in now
        self.limit = limit
        self._parked: list[_Parked] = []
        self._loading: set[str] = set()
        self.jobs = 0

    @classmethod
    def start(cls, engine: Any, loader: Any) -> AdapterLoads:
        """For a worker process: on when the loader thread can read adapter blocks for the
        engine, else off (never parks)."""
        cache = getattr(engine, "adapters", None)
        if cache is None or loader is None or loader.read_adapters is None:
            return cls(None, _no_jobs, str)
        return cls(cache, loader.submit, lambda: engine.adapter_dtype)

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, msg: Forward, tensors: list[torch.Tensor]) -> bool:
        """Whether `msg` must wait for adapter blocks (then it is parked and they are on their
        way). Raises TooManyWaiting, LoaderBusy (nothing parked)."""
        from blockllm.zoo.store import check_block_id

        if not msg.adapter_blocks or self._cache is None:
            return False
        try:
            ids = {check_block_id(b) for b in msg.adapter_blocks}
        except Exception:  # a bad id: the engine's submit refuses it with its message
            return False
        missing = {b for b in ids if not self._cache.has(b)}
        if not missing:
            return False
        if len(self._parked) >= self.limit:
            raise TooManyWaiting(f"{self.limit} requests wait for adapter blocks already")
        new = tuple(sorted(missing - self._loading))
        if new:
            self._submit(AdapterJob(new, self._dtype()))
            self._loading.update(new)
            self.jobs += 1
        self._parked.append(_Parked(msg, tensors, missing))
        return True

    def loaded(
        self, item: Loaded
    ) -> tuple[list[tuple[Forward, list[torch.Tensor]]], list[tuple[Forward, ErrorCode, str]]]:
        """The loader's answer to an AdapterJob: its blocks made resident; returns the parked
        FORWARDs now ready to submit, in arrival order, and those to refuse (code, message)."""
        job = item.job
        assert isinstance(job, AdapterJob) and self._cache is not None
        self._loading.difference_update(job.blocks)
        error = _describe(item.error) if item.error is not None else None
        if error is None:
            for bid, tensors in item.blocks.items():
                try:
                    self._cache.insert(bid, tensors)
                except Exception as e:  # not an adapter block
                    error = (ErrorCode.BAD_REQUEST, f"adapter block {bid[:12]}: {e}")
                    break
        ready: list[tuple[Forward, list[torch.Tensor]]] = []
        failed: list[tuple[Forward, ErrorCode, str]] = []
        keep: list[_Parked] = []
        for p in self._parked:
            if error is not None and p.missing & set(job.blocks):
                failed.append((p.msg, *error))
                continue
            p.missing = {b for b in p.missing if not self._cache.has(b)}
            if p.missing:
                keep.append(p)
            else:
                ready.append((p.msg, p.tensors))
        self._parked = keep
        return ready, failed

    def waits(self, msg: Forward, tensors: list[torch.Tensor], refuse: Refuse) -> bool:
        """`park`, refusing (QUEUE_FULL, retryable) when it cannot: whether the caller is done
        with `msg` for now."""
        try:
            return self.park(msg, tensors)
        except (TooManyWaiting, LoaderBusy) as e:
            refuse(msg, ErrorCode.QUEUE_FULL, str(e), True)
            return True

    def on_loaded(self, item: Loaded, forward: Forwarder, refuse: Refuse) -> None:
        """`loaded`, then `forward` each ready FORWARD and `refuse` each failed one."""
        ready, failed = self.loaded(item)
        for msg, code, text in failed:
            refuse(msg, code, text, False)
        for msg, tensors in ready:
            forward(msg, tensors)

    def drop(self, request_id: str) -> None:
        """A released request's parked FORWARDs go (its blocks still load: cheap, reusable)."""
        self._parked = [p for p in self._parked if p.msg.request_id != request_id]

    def clear(self) -> None:
        self._parked.clear()


def _no_jobs(job: AdapterJob) -> None:
    raise AssertionError(f"adapter loads are off: {job}")


def _describe(e: BaseException) -> tuple[ErrorCode, str]:
    """The typed refusal for a FORWARD whose adapter blocks could not be read or fetched."""
    code: Any = getattr(getattr(e, "code", None), "value", None)
    if code is None or code not in ErrorCode.__members__:
        code = ErrorCode.BAD_REQUEST.value  # missing, refused by the broker, corrupt
    return ErrorCode(code), f"adapter blocks: {type(e).__name__}: {e}"


__all__ = ["AdapterLoads", "LoaderBusy", "TooManyWaiting"]
