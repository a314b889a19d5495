"""KV migration on the worker side (broker/migrate.py drives it): KV_EXPORT answered with a
KV_SHARD of the request's K and V of one stage, KV_SHARD imported and KV_ACKed. A mixin of
`WorkerProc` (worker/proc.py); runs on the compute thread, between two steps.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from blockllm.broker import frames
from blockllm.broker.protocol import ErrorCode, KvAck, KvExport, KvShard
from blockllm.worker.errors import WorkerError

logger = logging.getLogger(__name__)


class KvMigration:
    """`_handle_kv_export` / `_handle_kv_shard` of a WorkerProc (its `engine`, `io`, `_known`,
    `stop_requested`)."""

    engine: Any
    io: Any
    stop_requested: bool
    _known: set[str]

    def _handle_kv_export(self, msg: KvExport, _tensors: list[torch.Tensor]) -> None:
        """KV_SHARD with the request's K and V of the stage (fresh CPU copies, referenced by
        the outbox until zmq has sent them), or a refusal (KV_ACK ok=false, typed code)."""
        try:
            k, v = self.engine.export_kv(msg.request_id, msg.stage_key, msg.length)
        except Exception as e:  # a peer's request must never take the worker down
            self._kv_refuse(msg, e)
            return
        metas = (frames.meta_of(k), frames.meta_of(v))
        shard = KvShard(msg.transfer_id, msg.request_id, msg.stage_key, msg.length, 0, metas)
        self.io.send(shard, (k, v))

    def _handle_kv_shard(self, msg: KvShard, tensors: list[torch.Tensor]) -> None:
        """Import a request's KV of one stage (admitted like a new request) and KV_ACK it."""
        if self.stop_requested:
            self._kv_refuse(msg, WorkerError("worker is shutting down"), ErrorCode.WORKER_LOST)
            return
        if len(tensors) != 2 or msg.length != (
            tensors[0].shape[1] if tensors[0].dim() == 4 else -1
        ):
            why = WorkerError("KV_SHARD needs K and V [L, n, H, Dh]")
            self._kv_refuse(msg, why, ErrorCode.BAD_REQUEST)
            return
        k, v = tensors
        try:
            self.engine.import_kv(msg.request_id, msg.stage_key, k, v, msg.max_total_len)
        except Exception as e:
            self._kv_refuse(msg, e)
            return
        self._known.add(msg.request_id)  # it holds KV here now: released by RELEASE or a reset
        self.io.send(KvAck(msg.transfer_id, msg.request_id, msg.stage_key, True))

    def _kv_refuse(
        self, msg: KvExport | KvShard, e: Exception, code: ErrorCode | None = None
    ) -> None:
        """KV_ACK(ok=false): `code`, or the WorkerError's own (INTERNAL for anything else)."""
        if code is None:
            if not isinstance(e, WorkerError):
                logger.exception("[kv] migration of %s failed", msg.request_id)
            code = ErrorCode(e.code.value) if isinstance(e, WorkerError) else ErrorCode.INTERNAL
        text = str(e)[:300]
        logger.info("[kv] %s of %s refused: %s %s", msg.KIND.name, msg.request_id, code.value, text)
        ack = KvAck(msg.transfer_id, msg.request_id, msg.stage_key, False, code.value, text)
        self.io.send(ack)
