"""What a work item must satisfy to enter the engine, and the KV it holds once admitted.

`check_item` validates a submitted item against its stages (values come from peers: every
failure is a typed BadRequest); `admit_kv` checks or reserves its KV pages in every stage of
its list when a step takes it. Compute thread only (worker/worker.py calls both).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from blockllm.worker.errors import BadRequest, KVMiss
from blockllm.worker.forward import Stage
from blockllm.worker.items import SamplingParams, WorkItem
from blockllm.worker.kv_cache import KVCacheManager
from blockllm.worker.logprobs import check_logprobs
from blockllm.worker.sampling import GREEDY


def check_item(
    item: WorkItem, stages: Sequence[Stage], device: torch.device
) -> tuple[torch.Tensor, int, SamplingParams]:
    """The item's input on `device`, its `max_total_len` (0 filled in) and its sampling.

    Raises BadRequest (stage order, shapes, ids, lengths, sampling, log-probabilities)."""
    check_route(stages)
    first, last = stages[0], stages[-1]
    x = check_input(item, first, device)
    n = x.shape[0]
    for name in ("past_len", "max_total_len", "step"):
        value = getattr(item, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRequest(f"{name} must be an integer >= 0, got {value!r}")
    total = item.max_total_len or item.past_len + n
    if total < item.past_len + n:
        raise BadRequest(f"past_len {item.past_len} + {n} new tokens exceeds max_total_len {total}")
    limit = first.model.max_positions  # a learned position embedding has a last row
    if limit is not None and total > limit:
        raise BadRequest(f"{total} tokens exceed the model's {limit} positions")
    sampling = GREEDY
    if last.info.has_head:
        sampling = (item.sampling or GREEDY).validate()
        check_logprobs(item, n, last.model.family.config.vocab_size)
    return x, total, sampling


def check_route(stages: Sequence[Stage]) -> None:
    """Raises BadRequest unless the stages are consecutive spans of one family."""
    for a, b in itertools.pairwise(stages):
        if a.info.end != b.info.start or a.model.family is not b.model.family:
            raise BadRequest(
                f"stages {a.info.key[:12]} [{a.info.start}, {a.info.end}) and "
                f"{b.info.key[:12]} [{b.info.start}, {b.info.end}) are not consecutive"
            )


def check_input(item: WorkItem, first: Stage, device: torch.device) -> torch.Tensor:
    """Token ids [T] for a first stage that embeds, else hidden states [T, D], on `device`.
    Raises BadRequest."""
    cfg = first.model.family.config
    if first.info.has_embed:
        t = item.tokens
        if t is None or item.hidden is not None:
            raise BadRequest("the first stage embeds: send token ids, not hidden states")
        if t.dim() != 1 or t.numel() == 0 or t.dtype not in (torch.int64, torch.int32):
            raise BadRequest(f"tokens must be int64 [T] with T >= 1, got {t.dtype} {t.shape}")
        if int(t.min()) < 0 or int(t.max()) >= cfg.vocab_size:
            raise BadRequest(f"token ids must be in [0, {cfg.vocab_size})")
        return t.to(device, torch.int64)
    h = item.hidden
    if h is None or item.tokens is not None:
        raise BadRequest("the first stage does not embed: send hidden states, not tokens")
    if h.dim() != 2 or h.shape[0] == 0 or h.shape[1] != cfg.hidden_size:
        raise BadRequest(f"hidden must be [T, {cfg.hidden_size}], got {tuple(h.shape)}")
    if not h.is_floating_point():
        raise BadRequest(f"hidden must be floating point, got {h.dtype}")
    return h.to(device, first.model.dtype)


def admit_kv(
    kv: KVCacheManager,
    stages: Sequence[Stage],
    item: WorkItem,
    n: int,
    step_no: int,
    protected: set[str],
) -> None:
    """Check (past_len > 0) or reserve (past_len == 0) KV for `n` new tokens in every stage
    of the item's list, all or nothing; `protected` requests are never evicted for it.
    Raises KVMiss, CacheFull, BadRequest."""
    with_kv = [st for st in stages if st.model.layers]
    if not with_kv:
        return
    if item.past_len > 0:
        for st in with_kv:
            seq = kv.get(st.info.key, item.request_id)
            if seq is None or seq.length != item.past_len:
                held = "none" if seq is None else f"{seq.length} tokens"
                raise KVMiss(
                    f"stage {st.info.key[:12]} holds no KV of {item.request_id!r} at"
                    f" {item.past_len} tokens (holds {held}): replay it"
                )
            if item.past_len + n > seq.capacity:
                raise BadRequest(f"{item.past_len + n} tokens exceed the {seq.capacity} reserved")
        return
    for st in with_kv:  # a restart drops what the request held before
        kv.free(st.info.key, item.request_id)
    need = sum(
        kv.pages_for(len(st.model.layers), item.max_total_len, st.info.key) for st in with_kv
    )
    kv.make_room(need, protected | {item.request_id})
    for st in with_kv:
        kv.reserve(st.info.key, item.request_id, len(st.model.layers), item.max_total_len, step_no)
