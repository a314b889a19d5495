"""Typed errors of the stage engine: every failure a caller can act on carries an ErrorCode.

The codes are plain strings with the same names as `blockllm.broker.protocol.ErrorCode`, so a
worker error travels on the wire as its `.value` unchanged.
"""

from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    """What went wrong with one work item; the broker decides (replay, reroute, fail)."""

    CACHE_FULL = "CACHE_FULL"  # no KV pages for the reservation, even after eviction
    KV_MISS = "KV_MISS"  # past_len > 0 but this worker holds no KV of it: replay
    QUEUE_FULL = "QUEUE_FULL"  # the stage's bounded queue is full: retry later / elsewhere
    UNKNOWN_STAGE = "UNKNOWN_STAGE"  # a stage key this worker does not host
    BAD_REQUEST = "BAD_REQUEST"  # malformed item (shapes, ids, lengths, stage order)


class InjectedFault(RuntimeError):
    """Raised by the test-only fault hook (`fault_after_steps`, mode RAISE)."""


class StartupLoadFailed(RuntimeError):
    """A configured stage could not be loaded at start: the worker cannot serve as asked."""


class BrokerRejected(RuntimeError):
    """The broker refused this worker for good (protocol version): fatal, never dropped."""


class WorkerError(Exception):
    """Base of the engine's typed errors; `code` is the ErrorCode sent back to the caller."""

    code: ErrorCode = ErrorCode.BAD_REQUEST

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CacheFull(WorkerError):
    code = ErrorCode.CACHE_FULL


class KVMiss(WorkerError):
    code = ErrorCode.KV_MISS


class QueueFull(WorkerError):
    code = ErrorCode.QUEUE_FULL


class UnknownStage(WorkerError):
    code = ErrorCode.UNKNOWN_STAGE


class BadRequest(WorkerError):
    code = ErrorCode.BAD_REQUEST
