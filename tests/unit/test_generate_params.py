"""GenerateParams: one value for sampling and limits, validated in one place, given to the
clients either whole (`params=`) or as keyword fields."""

from __future__ import annotations

import pytest

from blockllm.broker.protocol import Token
from blockllm.client import BadRequest, GenerateParams
from blockllm.client.request import build_generate, to_event


def test_keyword_fields_replace_the_params_values() -> None:
    base = GenerateParams(max_new_tokens=8, temperature=0.5, seed=3)
    p = GenerateParams.of(base, {"max_new_tokens": 4, "timeout": 2.0})
    assert p == GenerateParams(4, 0.5, 0, 1.0, 3, 2.0)
    assert GenerateParams.of(None, {}) == GenerateParams()
    with pytest.raises(TypeError, match="max_tokens"):
        GenerateParams.of(None, {"max_tokens": 4})


@pytest.mark.parametrize(
    ("fields", "what"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"seed": 1.5}, "seed"),
        ({"timeout": 0}, "timeout"),
        ({"top_logprobs": 21}, r"top_logprobs must be an int in \[0, 20\]"),
        ({"top_logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 6, "prompt_logprobs": True}, r"with prompt_logprobs .* \[0, 5\]"),
        ({"prompt_logprobs": 1}, "prompt_logprobs must be a bool"),
    ],
)
def test_a_bad_value_is_refused_before_anything_is_sent(fields: dict, what: str) -> None:
    with pytest.raises(BadRequest, match=what):
        build_generate("m", "hi", None, GenerateParams.of(None, fields))


def test_the_message_carries_the_params() -> None:
    msg = build_generate("m", None, [1, 2], GenerateParams(5, 0.7, 40, 0.9, 11, 3.0))
    assert (msg.max_new_tokens, msg.temperature, msg.top_k, msg.top_p) == (5, 0.7, 40, 0.9)
    assert (msg.seed, msg.timeout_s, msg.input_ids, msg.prompt) == (11, 3.0, (1, 2), None)
    assert (msg.top_logprobs, msg.prompt_logprobs) == (0, False)
    scored = build_generate("m", "hi", None, GenerateParams(top_logprobs=5, prompt_logprobs=True))
    assert (scored.top_logprobs, scored.prompt_logprobs) == (5, True)


def test_a_token_event_carries_its_logprobs() -> None:
    tok = Token("r", 0, 7, "a", None, 3, logprob=-0.5, top_ids=(7, 2), top_logprobs=(-0.5, -1.5))
    ev = to_event(tok)
    assert (ev.token_id, ev.logprob, ev.top_logprobs) == (7, -0.5, ((7, -0.5), (2, -1.5)))
    assert to_event(Token("r", 1, 4, "b")).top_logprobs == ()
