"""A tenant's chat template applied to messages: one code path for `POST /v1/chat/completions`
and `blockllm generate --chat`. The tokenizer comes from the broker's zoo
(`blockllm.client.http.tenants.Tenants.tokenizer`), so a client needs no local model files."""

from __future__ import annotations

from typing import Any


class ChatTemplateError(ValueError):
    """The model has no chat template, or its template refused the messages."""


def chat_prompt_ids(tok: Any, model: str, messages: list[dict[str, Any]]) -> list[int]:
    """apply_chat_template(messages, add_generation_prompt=True), tokenized the way transformers
    does it (the template writes the special tokens itself). Raises ChatTemplateError."""
    if not getattr(tok, "chat_template", None):
        raise ChatTemplateError(f"model {model!r} has no chat template in its tokenizer files")
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja's own errors, raise_exception() of a template
        raise ChatTemplateError(f"chat template of {model!r} refused the messages: {e}") from None
    return list(tok(text, add_special_tokens=False).input_ids)


async def fetch_chat_ids(
    broker: str,
    keys_dir: Any,
    model: str,
    messages: list[dict[str, Any]],
    timeout: float | None,
) -> list[int]:
    """The prompt ids of `messages` under `model`'s template, its tokenizer fetched from the
    broker as the HTTP API fetches it. Raises BlockLLMError (broker), ChatTemplateError."""
    from blockllm.client.aio import AsyncClient
    from blockllm.client.http.errors import ApiError
    from blockllm.client.http.tenants import Tenants

    async with AsyncClient(broker, keys_dir=keys_dir, timeout=timeout) as client:
        tenants = Tenants(client)
        try:
            tok = await tenants.tokenizer(model)
        except ApiError as e:  # no tokenizer in the zoo
            raise ChatTemplateError(e.message) from None
        finally:
            tenants.close()
    return chat_prompt_ids(tok, model, messages)
