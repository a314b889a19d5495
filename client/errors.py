"""Typed client errors: each carries the server's `code`, `message` and `retryable` flag.

A remote failure arrives as an `ERROR(request_id, code, message, retryable)` message and is
turned into one of these classes by `error_from` (never a bare `Exception`, never a re-pickled
remote object). Failures the client detects itself (deadline, lost connection, bad arguments)
use the same classes with a client-side code.
"""

from __future__ import annotations

from blockllm.broker.protocol import ErrorCode

# Codes the client uses for failures it detects on its own side (not on the wire).
CONNECTION_FAILED = "CONNECTION_FAILED"
BROKER_UNAVAILABLE = "BROKER_UNAVAILABLE"


class BlockLLMError(Exception):
    """Base of every error the client raises: `.code`, `.message`, `.retryable`."""

    default_code: str = ErrorCode.INTERNAL.value
    default_retryable: bool = False

    def __init__(
        self, message: str, *, code: str | None = None, retryable: bool | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.retryable = self.default_retryable if retryable is None else retryable

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class UnknownModel(BlockLLMError):
    """The broker does not know the model name (`UNKNOWN_MODEL`)."""

    default_code = ErrorCode.UNKNOWN_MODEL.value


class BadRequest(BlockLLMError):
    """The request is invalid (`BAD_REQUEST`): arguments, prompt too long, ids out of vocab."""

    default_code = ErrorCode.BAD_REQUEST.value


class Overloaded(BlockLLMError):
    """The broker's queues are full (`OVERLOADED`); retry later."""

    default_code = ErrorCode.OVERLOADED.value
    default_retryable = True


class RequestFailed(BlockLLMError):
    """Any other server-side failure; `.code` is the server's (WORKER_LOST, NO_ROUTE, ...)."""


class Timeout(BlockLLMError, TimeoutError):
    """A deadline passed: the client's own (`timeout=`) or the broker's (`TIMEOUT`)."""

    default_code = ErrorCode.TIMEOUT.value


class ConnectionFailed(BlockLLMError, ConnectionError):
    """The client cannot talk to the broker (closed client, bad address or keys, IO failure)."""

    default_code = CONNECTION_FAILED


class BrokerUnavailable(Timeout, ConnectionFailed):
    """No broker to answer: the connection dropped while a request was in flight, or none could
    be made within the client's connect_timeout. Both a `Timeout` and a `ConnectionFailed`."""

    default_code = BROKER_UNAVAILABLE
    default_retryable = True


_BY_CODE: dict[str, type[BlockLLMError]] = {
    ErrorCode.UNKNOWN_MODEL.value: UnknownModel,
    ErrorCode.BAD_REQUEST.value: BadRequest,
    ErrorCode.OVERLOADED.value: Overloaded,
    ErrorCode.TIMEOUT.value: Timeout,
}


def error_from(code: str, message: str, retryable: bool = False) -> BlockLLMError:
    """The exception for a server `ERROR`: UNKNOWN_MODEL, BAD_REQUEST, OVERLOADED and TIMEOUT get
    their own class; every other code (WORKER_LOST, NO_ROUTE, INTERNAL, unknown future codes) is
    a `RequestFailed` carrying that code."""
    cls = _BY_CODE.get(code, RequestFailed)
    return cls(message or code, code=code, retryable=retryable)


__all__ = [
    "BROKER_UNAVAILABLE",
    "CONNECTION_FAILED",
    "BadRequest",
    "BlockLLMError",
    "BrokerUnavailable",
    "ConnectionFailed",
    "Overloaded",
    "RequestFailed",
    "Timeout",
    "UnknownModel",
    "error_from",
]
