"""The FastAPI app of the OpenAI-compatible API (STYLE 7.12): one event loop; the lifespan
creates the broker's `AsyncClient` (its reader task routes replies by request id into
per-request queues) and the `Tenants` status task; one handler turns every error into OpenAI's
`{"error": {...}}` body.

Routes: GET /v1/models, GET /v1/models/{model}, POST /v1/completions,
POST /v1/chat/completions, GET /health (200 only when the broker answers and every model is
covered), GET /metrics (Prometheus). /health and /metrics need no key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from blockllm.client.aio import AsyncClient
from blockllm.client.http.apikeys import ApiKey, RateLimiter, key_hash, load_api_keys
from blockllm.client.http.chat import chat
from blockllm.client.http.common import Call
from blockllm.client.http.completions import completions
from blockllm.client.http.config import HttpConfig
from blockllm.client.http.errors import (
    AUTH,
    INTERNAL,
    NOT_FOUND,
    RATE_LIMIT,
    ApiError,
    bad_request,
)
from blockllm.client.http.metrics import maybe_metrics
from blockllm.client.http.schemas import ChatRequest, CompletionRequest, parse, validation_error
from blockllm.client.http.tenants import Tenants

logger = logging.getLogger(__name__)


def create_app(cfg: HttpConfig) -> FastAPI:
    """The app for `cfg`; the broker client is made when it starts (lifespan)."""
    keys = load_api_keys(cfg.api_keys_file) if cfg.api_keys_file else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = AsyncClient(
            cfg.broker, keys_dir=cfg.keys_dir, connect_timeout=cfg.connect_timeout_s
        )
        await client.__aenter__()
        tenants = Tenants(client, cfg.status_interval_s)
        try:  # ready (listening, READY=1) only once the broker answered
            stop = getattr(app.state, "should_stop", lambda: False)
            await tenants.first_status(cfg.broker, cfg.ready_timeout_s, stop)
        except BaseException as e:
            app.state.startup_error = e  # run_http_process says why it did not start
            await client.close()
            tenants.close()
            raise
        task = asyncio.create_task(tenants.run())
        s = app.state
        s.cfg, s.client, s.tenants, s.keys = cfg, client, tenants, keys
        s.limiter, s.metrics = RateLimiter(), maybe_metrics()
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()
            tenants.close()

    app = FastAPI(
        title="BlockLLM", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    _errors(app)
    _routes(app)
    return app


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = NOT_FOUND if e.status_code == 404 else "invalid_request_error"
        return _error_response(ApiError(e.status_code, str(e.detail), kind))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        logger.exception("[http] internal error on %s", request.url.path)
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}", INTERNAL))


def authorize(request: Request) -> ApiKey | None:
    """The caller's key (None: the endpoint is open); 401 when missing or unknown."""
    keys = request.app.state.keys
    if keys is None:
        return None
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(
            401, "Missing API key: send `Authorization: Bearer KEY`.", AUTH, code="invalid_api_key"
        )
    entry = keys.get(key_hash(key.strip()))
    if entry is None:
        raise ApiError(401, "Incorrect API key provided.", AUTH, code="invalid_api_key")
    return entry


async def admit(request: Request, key: ApiKey | None, model: str) -> None:
    """404 / 503 for the model (tenants.check_fresh), then the key's requests per minute (429)."""
    state = request.app.state
    await state.tenants.check_fresh(model, key is None or key.allows(model))
    if key is not None:
        wait = state.limiter.admit(key)
        if wait > 0:
            raise ApiError(
                429,
                f"Rate limit of {key.rpm} requests per minute reached for key {key.name!r}.",
                RATE_LIMIT,
                code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, round(wait)))},
            )


async def _body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None


async def _generate(request: Request, schema: type, endpoint: str, handler: Any) -> Any:
    call = Call(request.app.state, endpoint)
    try:
        key = authorize(request)
        req = parse(schema, await _body(request))
        await admit(request, key, req.model)
        call.model = req.model
        return await handler(call, req, request)
    except ApiError as e:
        call.status = e.status
        call.finish()
        raise


def _routes(app: FastAPI) -> None:
    @app.post("/v1/completions")
    async def post_completions(request: Request) -> Any:
        return await _generate(request, CompletionRequest, "completions", completions)

    @app.post("/v1/chat/completions")
    async def post_chat(request: Request) -> Any:
        return await _generate(request, ChatRequest, "chat", chat)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Any:
        key = authorize(request)
        tenants = request.app.state.tenants
        names = [m for m in tenants.models() if key is None or key.allows(m)]
        return {"object": "list", "data": [await _model_card(tenants, m) for m in names]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str, request: Request) -> Any:
        key = authorize(request)
        tenants = request.app.state.tenants
        if model not in tenants.models() or (key is not None and not key.allows(model)):
            from blockllm.client.http.errors import model_not_found

            raise model_not_found(model)
        return await _model_card(tenants, model)

    @app.get("/health")
    async def health(request: Request) -> Any:
        ok, body = request.app.state.tenants.health()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Any:
        m = request.app.state.metrics
        if m is None:
            raise ApiError(
                404, "metrics need prometheus_client (pip install prometheus_client)", NOT_FOUND
            )
        data, content_type = m.exposition()
        return Response(data, media_type=content_type)


async def _model_card(tenants: Tenants, model: str) -> dict[str, Any]:
    parents = await tenants.parents()
    entry = tenants.models().get(model, {})
    return {
        "id": model,
        "object": "model",
        "created": await tenants.created(model),
        "owned_by": "blockllm",
        "parent": parents.get(model),
        "root": model,
        "covered": bool(entry.get("covered")),
    }
