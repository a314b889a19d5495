"""BlockLLM client: `Client` (sync, thread-safe), `AsyncClient` (asyncio), typed errors."""

from blockllm.client.aio import AsyncClient
from blockllm.client.client import Client
from blockllm.client.errors import (
    BadRequest,
    BlockLLMError,
    BrokerUnavailable,
    ConnectionFailed,
    Overloaded,
    RequestFailed,
    Timeout,
    UnknownModel,
)
from blockllm.client.request import Completion, GenerateParams, TokenEvent

__all__ = [
    "AsyncClient",
    "BadRequest",
    "BlockLLMError",
    "BrokerUnavailable",
    "Client",
    "Completion",
    "ConnectionFailed",
    "GenerateParams",
    "Overloaded",
    "RequestFailed",
    "Timeout",
    "TokenEvent",
    "UnknownModel",
]
