"""Worker: stages loaded from the zoo + the KV shard + a batch queue per stage; no sockets.

`step()` drains ready work: for each stage with work, in chain order (by start position), ONE
batched forward runs all items now at that stage, prefills and single-token decodes of
different requests (and tenants) together; each item then moves on to the next stage of its
list within the same step, and items at the end of their list become WorkResults. The
process wrapper (worker/proc.py) owns the sockets and calls this from its compute thread;
nothing here is thread-safe. See docs/internals.md, "Engine API".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from blockllm.worker.admission import admit_kv, check_item
from blockllm.worker.batch_queue import BatchQueue
from blockllm.worker.blocks import BlockCache, Family, StageModel, resolve_family
from blockllm.worker.errors import BadRequest, ErrorCode, QueueFull, UnknownStage, WorkerError
from blockllm.worker.forward import Entry, Stage, run_stage
from blockllm.worker.items import (
    SamplingParams,
    StageInfo,
    WorkerConfig,
    WorkItem,
    WorkResult,
    check_span,
)
from blockllm.worker.kv_cache import KVCacheManager, KVStats
from blockllm.worker.lora import AdapterCache
from blockllm.zoo.chain import stage_blocks, stage_key

__all__ = [
    "ErrorCode",
    "QueueFull",
    "SamplingParams",
    "StageInfo",
    "WorkItem",
    "WorkResult",
    "Worker",
    "WorkerConfig",
    "WorkerStats",
    "stage_key",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """A snapshot of the engine's load. Before the KV pool exists, its bytes are the budget."""

    kv_total_bytes: int
    kv_free_bytes: int
    kv_used_bytes: int
    free_slots: int  # free places in all stage queues together
    queue_depths: dict[str, int]  # stage key -> items queued
    weight_bytes: int  # distinct block bytes held in memory, LoRA adapters' included
    steps: int
    forwards: dict[str, int]  # stage key -> batched forwards run so far
    items: dict[str, int]  # stage key -> items those forwards carried
    busy_s: dict[str, float] = field(default_factory=dict)  # stage key -> forward seconds
    adapters: dict[str, int] = field(default_factory=dict)  # stage key -> LoRA blocks resident


class Worker:
    """Hosts stages and runs them batched. Compute-thread only (see module docstring)."""

    def __init__(self, zoo: Any, config: WorkerConfig | None = None) -> None:
        self.zoo = zoo
        self.config = config or WorkerConfig()
        if self.config.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be float32, bfloat16 or float16, not {self.config.dtype!r}"
            )
        self.device = torch.device(self.config.device)
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        self.kv = KVCacheManager(self.config.kv_budget_bytes, self.config.page_size)
        self.blocks = BlockCache(self._load_block)
        self.adapters = AdapterCache(self._load_block, self.config.adapter_idle_blocks)
        self._stages: dict[str, Stage] = {}
        self._preread: dict[str, dict[str, torch.Tensor]] = {}  # during load_stage only
        self._serving = "float32"  # the dtype load_stage casts the blocks it reads to
        self._families: dict[str, Family] = {}
        self._deferred: list[WorkResult] = []  # results produced outside step()
        self._queued: set[str] = set()  # request ids with an item in some stage queue
        self._step_no = 0
        self.forward_s = 0.0  # wall time of all batched forwards so far (every stage)

    # -- stages --------------------------------------------------------------------------
    def _load_block(self, block_id: str) -> dict[str, torch.Tensor]:
        tensors = self._preread.get(block_id)
        if tensors is not None:  # read ahead by read_blocks (the process's loader thread)
            return tensors
        return self._read(block_id, self._serving)

    @property
    def adapter_dtype(self) -> str:
        """The dtype LoRA adapter blocks are read in now (that of the stage loaded last)."""
        return self._serving

    def read_block(self, block_id: str, dtype: str) -> dict[str, torch.Tensor]:
        """A block read (and verified) from the zoo, cast to `dtype`. Any thread."""
        return self._read(block_id, dtype)

    def served_dtype(self, manifest: Any) -> str:
        """The dtype this worker serves a model's blocks in: --dtype, else the model's own
        (a checkpoint that mixed dtypes is served in its dominant one)."""
        return self.config.dtype or getattr(manifest, "dtype", "") or "float32"

    def _read(self, block_id: str, dtype: str) -> dict[str, torch.Tensor]:
        """A block from the zoo (verified as stored), its tensors cast once to `dtype`."""
        tensors = self.zoo.load_block(
            block_id, device=self.device, verify=self.config.verify_blocks
        )
        want = getattr(torch, dtype)
        return {
            k: t.to(want) if t.is_floating_point() and t.dtype != want else t
            for k, t in tensors.items()
        }

    def read_blocks(self, model: str, start: int, end: int) -> dict[str, dict[str, torch.Tensor]]:
        """The tensors of the blocks of stage [start, end) of `model` not held yet, read (and
        hash-verified) from the zoo: the slow part of `load_stage`, for `preread`.

        Any thread: it touches only the zoo (and reads which blocks are held; one released
        meanwhile is simply read again by `load_stage`). Raises BadRequest, ZooError."""
        m = self.zoo.manifest(model)
        check_span(len(m.chain), start, end)
        return {
            bid: self._read(bid, self.served_dtype(m))
            for bid in dict.fromkeys(stage_blocks(m, start, end))
            if bid not in self.blocks
        }

    def load_stage(
        self,
        model: str,
        start: int,
        end: int,
        preread: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> StageInfo:
        """Load chain positions [start, end) of `model`; a stage already loaded under the same
        content key is reused (its `models` gains `model`). `preread`: blocks `read_blocks`
        returned, used instead of reading them here. Raises BadRequest, ZooError."""
        self._preread = preread or {}
        try:
            return self._load_stage(model, start, end)
        finally:
            self._preread = {}

    def _load_stage(self, model: str, start: int, end: int) -> StageInfo:
        m = self.zoo.manifest(model)
        check_span(len(m.chain), start, end)
        key = stage_key(m, start, end)
        if key in self._stages:
            st = self._stages[key]
            if model not in st.info.models:
                st.info = replace(st.info, models=(*st.info.models, model))
            return st.info
        family = self._family(m)
        self._serving = self.served_dtype(m)  # what _load_block casts to
        acquired: list[str] = []
        try:
            blocks = {}
            for pos in range(start, end):
                blocks[pos] = self.blocks.acquire(m.chain[pos])
                acquired.append(m.chain[pos])
            tied = None
            if end == len(m.chain) and m.tie_word_embeddings:
                tied = self.blocks.acquire(m.chain[0])
                acquired.append(m.chain[0])
            stage_model = StageModel(family, start, end, blocks, tied, self.device)
            if stage_model.layers:  # refused (CacheFull) when the KV budget cannot hold it
                geometry = family.kv_geometry(stage_model.dtype, self.device)
                self.kv.add_stage(key, geometry, len(stage_model.layers))
        except BaseException:
            for bid in acquired:
                self.blocks.release(bid)
            raise
        info = StageInfo(
            key=key,
            model=model,
            start=start,
            end=end,
            nbytes=sum(self.blocks.nbytes(b) for b in set(acquired)),
            dtype=str(stage_model.dtype).removeprefix("torch."),
            device=str(self.device),
            num_layers=len(stage_model.layers),
            chain_len=len(m.chain),
            block_ids=tuple(m.chain[start:end]),
            models=(model,),
        )
        c = self.config
        queue: BatchQueue[Entry] = BatchQueue(
            c.queue_capacity, c.max_batch_size, c.max_batch_tokens
        )
        self._stages[key] = Stage(info, stage_model, queue, acquired)
        logger.info("[stage] loaded %s [%d, %d) as %s", model, start, end, key[:12])
        return info

    def _family(self, m: Any) -> Family:
        fp = m.fingerprint  # manifests from the importer carry one
        if not fp:
            from blockllm.zoo.families import fingerprint

            fp = fingerprint(m.config)
        if fp not in self._families:
            self._families[fp] = resolve_family(m.model_type, m.config)
        return self._families[fp]

    def unload_stage(self, key: str) -> None:
        """Drop a stage: its queued items fail UNKNOWN_STAGE (next step), its KV and weights
        (unless another stage shares them) are freed. Raises UnknownStage."""
        st = self._stage(key)
        for e in st.queue.remove_if(lambda e: True):
            self._queued.discard(e.item.request_id)
            self._deferred.append(_error(e.item, UnknownStage(f"stage {key} was unloaded")))
        del self._stages[key]
        self.kv.remove_stage(key)
        for bid in st.blocks:
            self.blocks.release(bid)
        logger.info("[stage] unloaded %s", key[:12])

    def stages(self) -> list[StageInfo]:
        return [st.info for st in self._stages.values()]

    def set_max_batch_size(self, key: str, max_batch_size: int) -> None:
        """Items per batched forward of one stage from the next step on (the planner tunes it).

        Raises UnknownStage, BadRequest (not an integer >= 1)."""
        st = self._stage(key)
        ok = isinstance(max_batch_size, int) and not isinstance(max_batch_size, bool)
        if not ok or max_batch_size < 1:
            raise BadRequest(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        st.queue.max_batch_size = max_batch_size

    def batch_limits(self) -> dict[str, int]:
        """Stage key -> its max batch size now."""
        return {k: st.queue.max_batch_size for k, st in self._stages.items()}

    def _stage(self, key: str) -> Stage:
        st = self._stages.get(key)
        if st is None:
            raise UnknownStage(f"stage {key!r} is not loaded on this worker")
        return st

    # -- requests ------------------------------------------------------------------------
    def submit(self, item: WorkItem) -> None:
        """Validate and enqueue into the first stage's bounded queue.

        Raises UnknownStage, BadRequest (shapes, ids, lengths, stage order) or QueueFull.
        """
        if not item.stage_keys:
            raise BadRequest("a work item needs at least one stage key")
        stages = [self._stage(k) for k in item.stage_keys]
        x, total, sampling = check_item(item, stages, self.device)
        n = x.shape[0]
        if item.request_id in self._queued:
            raise BadRequest(f"request {item.request_id!r} already has an item queued")
        # the item's LoRA blocks by chain position, held for the request from now on
        layers = [(st.info.start, st.model) for st in stages]
        adapters = self.adapters.admit(item.request_id, item.adapters, layers)
        entry = Entry(replace(item, max_total_len=total), x, n, 0, sampling, adapters)
        stages[0].queue.push(entry, n)
        self._queued.add(item.request_id)

    def release(self, request_id: str) -> None:
        """Forget a request: free its KV in every stage, drop its queued items and its hold
        on LoRA blocks."""
        self.kv.free_request(request_id)
        self.adapters.release(request_id)
        for st in self._stages.values():
            st.queue.remove_if(lambda e: e.item.request_id == request_id)
        self._queued.discard(request_id)

    def withdraw(self, request_id: str) -> bool:
        """Drop the request's queued item, keeping its KV (a speculative run overtaken by the
        real input, worker/speculate.py); False when none was queued."""
        removed = 0
        for st in self._stages.values():
            removed += len(st.queue.remove_if(lambda e: e.item.request_id == request_id))
        self._queued.discard(request_id)
        return removed > 0

    def stage_model(self, key: str) -> StageModel:
        """The module of a loaded stage (worker/speculate.py rewrites a layer's KV with it).
        Raises UnknownStage."""
        return self._stage(key).model

    def kv_stats(self) -> KVStats:
        return self.kv.stats()

    # -- KV migration (WorkerProc._handle_kv_*; the broker's broker/migrate.py) --------------
    def export_kv(
        self, request_id: str, key: str, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU copies of the request's K and V in stage `key`, positions [0, length), each
        `[n_layers, length, n_kv_heads, head_dim]`; the request keeps its KV here until
        released. Raises UnknownStage, BadRequest (no layers, an item queued), KVMiss."""
        self._kv_stage(key, request_id)
        k, v = self.kv.export(key, request_id, length)
        return k.to("cpu"), v.to("cpu")

    def import_kv(
        self, request_id: str, key: str, k: torch.Tensor, v: torch.Tensor, max_total_len: int
    ) -> None:
        """Admit a request whose KV of stage `key` arrives as tensors (`export_kv`'s): pages
        for `max_total_len` tokens are reserved like for a new request (idle requests may be
        evicted); its next item continues at past_len = length. Raises UnknownStage,
        BadRequest, CacheFull."""
        st = self._kv_stage(key, request_id)
        if k.dim() != 4 or k.shape[0] != len(st.model.layers):
            raise BadRequest(f"KV shard {tuple(k.shape)} for {len(st.model.layers)} layers")
        protected = set(self._queued)
        self.kv.import_(key, request_id, k, v, max_total_len, self._step_no, protected)

    def _kv_stage(self, key: str, request_id: str) -> Stage:
        st = self._stage(key)
        if not st.model.layers:
            raise BadRequest(f"stage {key[:12]} has no decoder layers: it holds no KV")
        if request_id in self._queued:  # its KV is about to change
            raise BadRequest(f"request {request_id!r} has an item queued")
        return st

    def stats(self) -> WorkerStats:
        """Load facts for READY / heartbeats (cheap; compute thread)."""
        kv = self.kv.stats()
        total, free = kv.total_bytes, kv.free_bytes
        if self.kv.arena is None:  # allocated with the first stage that has layers
            total = free = self.config.kv_budget_bytes
        return WorkerStats(
            kv_total_bytes=total,
            kv_free_bytes=free,
            kv_used_bytes=kv.used_bytes,
            free_slots=sum(st.queue.free_slots for st in self._stages.values()),
            queue_depths={k: len(st.queue) for k, st in self._stages.items()},
            weight_bytes=self.blocks.total_bytes + self.adapter_bytes,
            steps=self._step_no,
            forwards={k: st.forwards for k, st in self._stages.items()},
            items={k: st.items for k, st in self._stages.items()},
            busy_s={k: st.busy_s for k, st in self._stages.items()},
            adapters=self.adapters.per_span(
                {k: (st.info.start, st.info.end) for k, st in self._stages.items()}
            ),
        )

    @property
    def adapter_bytes(self) -> int:
        """Every byte held for LoRA adapters: their pools, blocks read but not yet placed and
        the compact stacks of the stages' kept plans."""
        plans = sum(st.model.lora.plan_bytes for st in self._stages.values())
        return self.adapters.total_bytes + plans

    def queued(self) -> int:
        """Items waiting in all stage queues (plus results produced outside a step)."""
        return sum(len(st.queue) for st in self._stages.values()) + len(self._deferred)

    # -- the step ------------------------------------------------------------------------
    def step(self, limit: int | None = None) -> list[WorkResult]:
        """Run every stage with ready work once, in chain order; return finished items.
        `limit`: at most this many items per forward (a group, worker/groups.py)."""
        self._step_no += 1
        results, self._deferred = self._deferred, []
        # requests about to run are never evicted to make room for others
        protected = set(self._queued)
        arrivals: dict[str, list[Entry]] = {}
        ran: set[str] = set()
        with torch.inference_mode():
            while (key := self._next_stage(arrivals, ran)) is not None:
                ran.add(key)
                st = self._stages[key]
                entries = arrivals.pop(key, [])
                busy = sum(e.n for e in entries)
                for e in st.queue.take(len(entries), busy, limit):
                    self._queued.discard(e.item.request_id)
                    try:
                        self._admit(e, protected)
                        entries.append(e)
                    except WorkerError as err:
                        results.append(_error(e.item, err))
                if entries:
                    before = st.busy_s
                    done, moved = run_stage(st, entries, self.kv, self.adapters, self._step_no)
                    self.forward_s += st.busy_s - before
                    results.extend(done)
                    for e in moved:
                        arrivals.setdefault(e.item.stage_keys[e.at], []).append(e)
        assert not arrivals, "an item advanced to a stage that already ran this step"
        return results

    def _next_stage(self, arrivals: dict[str, list[Entry]], ran: set[str]) -> str | None:
        """The not-yet-run stage with work that comes first in chain order."""
        ready = [
            k for k, st in self._stages.items() if k not in ran and (arrivals.get(k) or st.queue)
        ]
        return min(ready, key=lambda k: (self._stages[k].info.start, k), default=None)

    def _admit(self, e: Entry, protected: set[str]) -> None:
        """Check or reserve the item's KV in every stage of its list, all or nothing.
        Raises KVMiss, CacheFull, BadRequest, UnknownStage."""
        stages = [self._stage(k) for k in e.item.stage_keys]
        admit_kv(self.kv, stages, e.item, e.n, self._step_no, protected)


def _error(item: WorkItem, err: WorkerError) -> WorkResult:
    logger.debug("[item] %s step %d failed %s: %s", item.request_id, item.step, err.code, err)
    return WorkResult(item.request_id, item.step, error=err.code, message=err.message)
