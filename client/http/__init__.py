"""The OpenAI-compatible HTTP API: one process in front of the broker (`blockllm http`).

Every tenant sits behind one endpoint and is chosen by the request's `model` field; with
`--api-keys FILE` each key may use only its own models (apikeys.py). The process is a client of
the broker over the usual protocol: one event loop, FastAPI + uvicorn, the `AsyncClient`
created in the app's lifespan (its one reader task routes replies by request id into
per-request queues). Modules:

    config.py     HttpConfig (frozen), the process's settings
    server.py     run_http_process(cfg): uvicorn, signals, the ready handshake, sd_notify
    app.py        create_app(cfg): lifespan, routes, auth, the one error handler
    tenants.py    models, their manifests and tokenizers (fetched from the broker), coverage
    schemas.py    pydantic request models mirroring OpenAI's (unknown fields ignored)
    choices.py    one choice's generation: stop sequences, logprobs, usage
    responses.py  OpenAI response bodies and SSE chunks
    errors.py     ApiError and OpenAI's error body
    apikeys.py    the --api-keys TOML: hashed keys, models per key, requests per minute
    metrics.py    Prometheus metrics of the HTTP layer (/metrics)

Importing this package imports neither FastAPI nor torch; `app` and `server` do.
"""

from blockllm.client.http.config import HttpConfig

__all__ = ["HttpConfig"]
