"""KV migration on the worker side (broker/migrate.py drives it): KV_EXPORT answered with a
KV_SHARD of the request's K and V of one stage, KV_SHARD imported and KV_ACKed. The answers
`WorkerProc._handle_kv_export` / `_handle_kv_shard` (worker/proc.py) send; compute thread,
between two steps.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from blockllm.broker import frames
from blockllm.broker.protocol import ErrorCode, KvAck, KvExport, KvShard
from blockllm.worker.errors import WorkerError

logger = logging.getLogger(__name__)


def export_kv(engine: Any, msg: KvExport) -> tuple[KvShard | KvAck, tuple[torch.Tensor, ...]]:
    """KV_SHARD with the request's K and V of the stage (fresh CPU copies: the outbox keeps
    them referenced until zmq has sent them), or a refusal (KV_ACK ok=false, typed code)."""
    try:
        k, v = engine.export_kv(msg.request_id, msg.stage_key, msg.length)
    except Exception as e:  # a peer's request must never take the worker down
        return refusal(msg, e), ()
    metas = (frames.meta_of(k), frames.meta_of(v))
    return KvShard(msg.transfer_id, msg.request_id, msg.stage_key, msg.length, 0, metas), (k, v)


def import_kv(engine: Any, msg: KvShard, tensors: list[torch.Tensor], stopping: bool) -> KvAck:
    """Import a request's KV of one stage (admitted like a new request): its KV_ACK (ok, or a
    refusal with a typed code)."""
    if stopping:
        return refusal(msg, WorkerError("worker is shutting down"), ErrorCode.WORKER_LOST)
    if len(tensors) != 2 or msg.length != (tensors[0].shape[1] if tensors[0].dim() == 4 else -1):
        why = WorkerError("KV_SHARD needs K and V [L, n, H, Dh]")
        return refusal(msg, why, ErrorCode.BAD_REQUEST)
    k, v = tensors
    try:
        engine.import_kv(msg.request_id, msg.stage_key, k, v, msg.max_total_len)
    except Exception as e:
        return refusal(msg, e)
    return KvAck(msg.transfer_id, msg.request_id, msg.stage_key, True)


def refusal(msg: KvExport | KvShard, e: Exception, code: ErrorCode | None = None) -> KvAck:
    """KV_ACK(ok=false): `code`, or the WorkerError's own (INTERNAL for anything else)."""
    if code is None:
        if not isinstance(e, WorkerError):
            logger.exception("[kv] migration of %s failed", msg.request_id)
        code = ErrorCode(e.code.value) if isinstance(e, WorkerError) else ErrorCode.INTERNAL
    text = str(e)[:300]
    logger.info("[kv] %s of %s refused: %s %s", msg.KIND.name, msg.request_id, code.value, text)
    return KvAck(msg.transfer_id, msg.request_id, msg.stage_key, False, code.value, text)
