"""Errors of the HTTP API in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure becomes an `ApiError` (status + body) before it leaves the app: validation errors
are 400 (never FastAPI's 422 shape), a missing or wrong key 401, an unknown model -- or one the
key may not use, so its existence is not revealed -- 404, too many requests or an overloaded
broker 429, an unreachable broker or an uncovered model 503, anything else 500.
"""

from __future__ import annotations

from typing import Any

from blockllm.broker.protocol import ErrorCode
from blockllm.client.errors import BlockLLMError, BrokerUnavailable, ConnectionFailed

BAD_REQUEST = "invalid_request_error"
AUTH = "authentication_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_exceeded"
UNAVAILABLE = "service_unavailable"
INTERNAL = "internal_error"


class ApiError(Exception):
    """An HTTP error with OpenAI's body; `headers` go out with it (Retry-After, ...)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, BAD_REQUEST, param=param)


def model_not_found(model: str) -> ApiError:
    """The same answer for an unknown model and for one the key may not use."""
    return ApiError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        NOT_FOUND,
        param="model",
        code="model_not_found",
    )


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, UNAVAILABLE, code="unavailable")


def from_broker(e: BlockLLMError, model: str) -> ApiError:
    """The HTTP error for a failure the broker (or the client library) reported."""
    code = e.code
    if code == ErrorCode.BAD_REQUEST.value:
        return bad_request(e.message)
    if code == ErrorCode.UNKNOWN_MODEL.value:
        return model_not_found(model)
    if code in (ErrorCode.OVERLOADED.value, ErrorCode.QUEUE_FULL.value):
        return ApiError(
            429,
            f"overloaded: {e.message}",
            RATE_LIMIT,
            code="overloaded",
            headers={"Retry-After": "1"},
        )
    if code == ErrorCode.NO_ROUTE.value:
        return unavailable(f"model {model!r} is not served by any worker now: {e.message}")
    if isinstance(e, (BrokerUnavailable, ConnectionFailed)):
        return unavailable(f"broker unreachable: {e.message}")
    if code == ErrorCode.TIMEOUT.value:
        return ApiError(503, f"timed out: {e.message}", UNAVAILABLE, code="timeout")
    return ApiError(500, f"{code}: {e.message}", INTERNAL, code=code.lower())
