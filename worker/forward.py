"""One batched forward of one stage: the engine's inner loop (worker/worker.py schedules it).

`run_stage` takes the entries now at a stage, runs them through it as ONE forward (prefills
and single-token decodes of different requests together, over the paged KV), and either moves
each entry on to the next stage of its list or finishes it: hidden states at the end of its
list, a sampled token (with its log-probabilities) at the head. Compute thread only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from blockllm.worker.attention import plan_step
from blockllm.worker.batch_queue import BatchQueue
from blockllm.worker.blocks import StageModel
from blockllm.worker.items import SamplingParams, StageInfo, WorkItem, WorkResult
from blockllm.worker.kv_cache import KVCacheManager
from blockllm.worker.logprobs import prompt_logprobs, top_alternatives
from blockllm.worker.lora import AdapterCache, AdapterMap
from blockllm.worker.sampling import GREEDY, sample


@dataclass(slots=True)
class Entry:
    """A submitted item on its way through its stages within one step."""

    item: WorkItem
    x: torch.Tensor  # tokens [T] or hidden [T, D] on the worker's device
    n: int  # T
    at: int = 0  # index into item.stage_keys of the stage it is at
    sampling: SamplingParams = GREEDY
    adapters: AdapterMap = field(default_factory=AdapterMap)  # chain position -> LoRA block


@dataclass(slots=True)
class Stage:
    """A loaded stage: its facts, its module, its bounded queue and its counters."""

    info: StageInfo
    model: StageModel
    queue: BatchQueue[Entry]
    blocks: list[str]  # block ids acquired (released on unload)
    forwards: int = 0
    items: int = 0
    busy_s: float = 0.0  # wall time of its forwards (the planner's per-stage latency)


def run_stage(
    st: Stage,
    entries: list[Entry],
    kv: KVCacheManager,
    adapters: AdapterCache,
    step_no: int,
) -> tuple[list[WorkResult], list[Entry]]:
    """One batched forward of `entries` (admitted: they hold KV) through stage `st`.

    Returns the finished items' results and the entries that moved on, each with its
    stage index advanced and its input set to its rows of this stage's output."""
    # stable: single-token items first; each adapter's rows consecutive (worker/lora.py)
    entries.sort(key=lambda e: (e.n != 1, e.adapters.order))
    st.forwards += 1
    st.items += len(entries)
    t0 = time.perf_counter()
    h = _forward(st, entries, kv, adapters, step_no)
    if st.info.has_head:
        results = _head(st, entries, h)
        st.busy_s += time.perf_counter() - t0
        return results, []
    settle(h)  # CUDA: the stage's kernels done, so busy_s times them, not their launch
    st.busy_s += time.perf_counter() - t0
    results: list[WorkResult] = []
    moved: list[Entry] = []
    # h: [N, D] -> one [T_i, D] view per entry, in batch order
    for e, out in zip(entries, h.split([e.n for e in entries]), strict=True):
        e.at += 1
        if e.at < len(e.item.stage_keys):
            e.x = out
            moved.append(e)
        else:
            results.append(WorkResult(e.item.request_id, e.item.step, hidden=out))
    return results, moved


def _head(st: Stage, entries: list[Entry], h: torch.Tensor) -> list[WorkResult]:
    """Sample each entry's next token from its last position of `h` [N, D]."""
    # only each request's last position goes through the head (and, for an item that asks
    # for its prompt's logprobs, the positions before it: worker/logprobs.py)
    last = torch.tensor([e.n for e in entries], device=h.device).cumsum(0) - 1
    logits = st.model.logits(h[last])  # [B, D] -> [B, V]
    positions = [e.item.past_len + e.n for e in entries]
    tokens, logprobs = sample(logits, [e.sampling for e in entries], positions)
    tops = top_alternatives(logits, [e.item.top_logprobs for e in entries])
    results = []
    for i, (e, tok, lp) in enumerate(zip(entries, tokens, logprobs, strict=True)):
        lps, alts = (), ()
        if e.item.targets:  # this item's rows of h: [last - n + 1, last]
            rows = h[int(last[i]) - e.n + 1 : int(last[i])]  # [n - 1, D]
            k = e.item.top_logprobs
            lps, alts = prompt_logprobs(st.model.logits, rows, e.item.targets, k)
        item = e.item
        results.append(
            WorkResult(
                item.request_id,
                item.step,
                None,
                tok,
                lp,
                top=tops[i],
                prompt_logprobs=lps,
                prompt_top=alts,
            )
        )
    return results


def _forward(
    st: Stage, entries: list[Entry], kv: KVCacheManager, adapters: AdapterCache, step_no: int
) -> torch.Tensor:
    """Stage input of all entries flattened -> stage output hidden [N, D]."""
    model = st.model
    x = torch.cat([e.x for e in entries]) if len(entries) > 1 else entries[0].x
    positions = None
    if model.needs_positions:  # learned positions: each new token's absolute position
        positions = torch.cat(
            [torch.arange(e.item.past_len, e.item.past_len + e.n) for e in entries]
        ).to(x.device)  # [N]
    h = model.embed(x, positions) if st.info.has_embed else x  # [N] -> [N, D] | [N, D]
    if not model.layers:
        return h
    seqs = [kv.get(st.info.key, e.item.request_id) for e in entries]
    assert all(s is not None for s in seqs), "admitted items hold KV in every stage"
    pool = kv.pool_of(st.info.key)
    plan = plan_step(
        pool,
        model.layer0,
        len(model.layers),
        [(s.pages, e.item.past_len, e.n) for s, e in zip(seqs, entries, strict=True)],  # type: ignore[union-attr]
    )
    model.lora.prepare(
        max(st.info.start, 1),
        [e.adapters for e in entries],
        [e.n for e in entries],
        adapters,
    )
    try:
        h = model.run_layers(h, plan)
    finally:
        model.lora.finish()
    for s, e in zip(seqs, entries, strict=True):
        s.length = e.item.past_len + e.n  # type: ignore[union-attr]
        s.last_used = step_no  # type: ignore[union-attr]
    return h


def settle(t: torch.Tensor) -> None:
    """Wait until the kernels queued for `t`'s device are done (CUDA runs them asynchronously:
    a clock read before this times their launch only). Free on the CPU."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
