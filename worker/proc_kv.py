"""KV migration on the worker process: the handlers of KV_EXPORT and KV_SHARD (compute thread).

The broker moves a running request's stage to another worker by asking the old one to export
the request's KV of that stage (KV_EXPORT -> KV_SHARD with K and V as two tensor frames) and
forwarding that shard, frames as received, to the new one, which admits it like a new request
(pages reserved for the request's `max_total_len`) and answers KV_ACK. Every refusal is a
KV_ACK with ok=False and a typed code: the broker then falls back to a replay. The old copy
stays until the broker's RELEASE. See broker/migrate.py for the broker's side.

Registered in `WorkerProc._handlers` (worker/proc.py) as
`functools.partial(handle_kv_export, self)` and `functools.partial(handle_kv_shard, self)`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from blockllm.broker import frames
from blockllm.broker.protocol import ErrorCode, KvAck, KvExport, KvShard
from blockllm.worker.errors import WorkerError

logger = logging.getLogger(__name__)


def _refuse(proc: Any, msg: KvExport | KvShard, code: str, message: str) -> None:
    logger.info("[kv] %s of %s refused: %s %s", msg.KIND.name, msg.request_id, code, message)
    proc.io.send(KvAck(msg.transfer_id, msg.request_id, msg.stage_key, False, code, message))


def _code(e: Exception) -> str:
    if isinstance(e, WorkerError):
        return e.code.value
    logger.exception("[kv] migration failed")
    return ErrorCode.INTERNAL.value


def handle_kv_export(proc: Any, msg: KvExport, _tensors: list[torch.Tensor]) -> None:
    """Answer KV_EXPORT with the request's K and V of the stage (a KV_SHARD), or a refusal."""
    try:
        k, v = proc.engine.export_kv(msg.request_id, msg.stage_key, msg.length)
    except Exception as e:  # a peer's request must never take the worker down
        _refuse(proc, msg, _code(e), str(e)[:300])
        return
    # fresh CPU copies, referenced by the outbox until zmq has sent them (zero-copy frames)
    metas = (frames.meta_of(k), frames.meta_of(v))
    shard = KvShard(msg.transfer_id, msg.request_id, msg.stage_key, msg.length, 0, metas)
    proc.io.send(shard, (k, v))
    logger.debug("[kv] exported %s of %s: %d tokens", msg.stage_key[:12], msg.request_id,
                 msg.length)  # fmt: skip


def handle_kv_shard(proc: Any, msg: KvShard, tensors: list[torch.Tensor]) -> None:
    """Import a request's KV of one stage (forwarded by the broker) and KV_ACK the outcome."""
    if proc.stop_requested:
        _refuse(proc, msg, ErrorCode.WORKER_LOST.value, "worker is shutting down")
        return
    if len(tensors) != 2 or msg.length != (tensors[0].shape[1] if tensors[0].dim() == 4 else -1):
        _refuse(proc, msg, ErrorCode.BAD_REQUEST.value, "KV_SHARD needs K and V [L, n, H, Dh]")
        return
    k, v = tensors
    try:
        proc.engine.import_kv(msg.request_id, msg.stage_key, k, v, msg.max_total_len)
    except Exception as e:
        _refuse(proc, msg, _code(e), str(e)[:300])
        return
    proc._known.add(msg.request_id)  # it holds KV here now: released by RELEASE or a reset
    proc.io.send(KvAck(msg.transfer_id, msg.request_id, msg.stage_key, True))
    logger.debug("[kv] imported %s of %s: %d tokens", msg.stage_key[:12], msg.request_id,
                 msg.length)  # fmt: skip
