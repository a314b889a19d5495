"""The OpenAI-compatible HTTP API end to end: the official `openai` client (strict response
validation) against `blockllm http` (a real uvicorn process on 127.0.0.1, a port from the OS) in
front of a real broker and two workers serving two tiny tenants; outputs checked against HF.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from blockllm.client.http.apikeys import add_api_key
from blockllm.client.http.config import HttpConfig
from tests.integration.cluster import cluster, hf_greedy, make_zoo, perturbed_copy
from tests.integration.test_serve_cli import BLOCKLLM, read_line

openai = pytest.importorskip("openai")

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
PROMPT = "Return a new list of the items"


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoTokenizer

    base = tiny_checkpoint("llama")
    ft = perturbed_copy(base, tmp_path_factory.mktemp("ft"), layers=[2, 3])
    tok = AutoTokenizer.from_pretrained(ft)
    tok.chat_template = CHAT_TEMPLATE  # the fine-tune is a chat model; the base is not
    tok.save_pretrained(ft)
    return {"base": base, "ft": ft}


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory) -> Any:
    """(cluster, open HTTP URL, keyed HTTP URL, keys {name: key})."""
    zoo = make_zoo(tmp_path_factory.mktemp("zoo"), checkpoints)
    keys_file = tmp_path_factory.mktemp("keys") / "api_keys.toml"
    keys = {
        "alice": add_api_key(keys_file, "alice", ["base"], rpm=3),
        "bob": add_api_key(keys_file, "bob", ["*"]),
    }
    workers = {"w0": ["base:0-3", "ft:0-3"], "w1": ["base:3-6", "ft:3-6"]}
    with cluster(zoo, workers, ["base", "ft"]) as c:
        url = c.launcher.start_http(HttpConfig(broker=c.endpoint, port=0), 60)
        keyed = c.launcher.start_http(
            HttpConfig(broker=c.endpoint, port=0, api_keys_file=str(keys_file)), 60
        )
        yield c, url, keyed, keys


def sdk(url: str, key: str = "none", strict: bool = True) -> Any:
    """The SDK with strict response validation; not for streamed *completions*: its model of
    a completions chunk requires a finish_reason, which OpenAI's own chunks leave null until
    the last one (chat chunks are modelled right)."""
    return openai.OpenAI(
        base_url=url, api_key=key, max_retries=0, timeout=60, _strict_response_validation=strict
    )


def async_sdk(url: str, strict: bool = True) -> Any:
    return openai.AsyncOpenAI(
        base_url=url, api_key="none", max_retries=0, timeout=60, _strict_response_validation=strict
    )


def tokenizer(ckpt: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


def hf_text(ckpt: Path, ids: list[int], n: int) -> tuple[str, list[int]]:
    out = hf_greedy(ckpt, ids, n)
    return tokenizer(ckpt).decode(out, skip_special_tokens=True), out


def hf_logprobs(ckpt: Path, ids: list[int]) -> torch.Tensor:
    from tests.integration.cluster import _hf_model

    with torch.inference_mode():
        logits = _hf_model(str(ckpt))(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)  # [T, V]


def test_models_list_every_tenant_with_its_parent(served) -> None:
    _, url, _, _ = served
    page = sdk(url).models.list()
    cards = {m.id: m for m in page.data}
    assert set(cards) == {"base", "ft"}
    assert cards["ft"].model_extra["parent"] == "base"
    assert cards["base"].model_extra["parent"] is None
    assert sdk(url).models.retrieve("ft").id == "ft"


@pytest.mark.parametrize("model", ["base", "ft"])
def test_greedy_completion_equals_hf(served, checkpoints, model) -> None:
    _, url, _, _ = served
    ids = tokenizer(checkpoints[model])(PROMPT).input_ids
    want, want_ids = hf_text(checkpoints[model], ids, 12)
    out = sdk(url).completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text == want
    assert out.choices[0].finish_reason == ("stop" if 1 in want_ids else "length")
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(want_ids)
    # the same as token ids, two prompts in one request
    out = sdk(url).completions.create(
        model=model, prompt=[ids, ids[:3]], max_tokens=5, temperature=0
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[1].text == hf_text(checkpoints[model], ids[:3], 5)[0]


def test_chat_stream_equals_hf_over_the_template(served, checkpoints) -> None:
    _, url, _, _ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    tok = tokenizer(checkpoints["ft"])
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    want, want_ids = hf_text(checkpoints["ft"], ids, 10)
    stream = sdk(url).chat.completions.create(
        model="ft",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert got == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert chunks[-1].usage.completion_tokens == len(want_ids)
    whole = sdk(url).chat.completions.create(
        model="ft", messages=messages, max_tokens=10, temperature=0
    )
    assert whole.choices[0].message.content == want


def test_generate_chat_applies_the_tenants_template(served, checkpoints) -> None:
    """`blockllm generate --chat` (issue 19.7): the prompt goes through the tenant's chat
    template, its tokenizer fetched from the broker as the HTTP API does; a model without a
    template is a clear usage error (exit 5), not silent raw text."""
    from click.testing import CliRunner

    from blockllm.client.cli import cli

    c, _, _, _ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    tok = tokenizer(checkpoints["ft"])
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want, want_ids = hf_text(checkpoints["ft"], tok(text, add_special_tokens=False).input_ids, 8)
    args = ["generate", "--broker", c.endpoint, "--max-tokens", "8", "--timeout", "60"]
    out = CliRunner().invoke(
        cli, [*args, "--model", "ft", "--chat", "--system", "Be brief.", "--json", PROMPT]
    )
    assert out.exit_code == 0, out.output
    body = json.loads(out.output)
    assert body["token_ids"] == want_ids and body["text"] == want
    refused = CliRunner().invoke(cli, [*args, "--model", "base", "--chat", PROMPT])
    assert getattr(refused.exception, "exit_code", None) == 5  # CliError: `main` exits 5
    assert "no chat template" in str(refused.exception)


def test_stop_sequences(served, checkpoints) -> None:
    _, url, _, _ = served
    ids = tokenizer(checkpoints["base"])(PROMPT).input_ids
    want, _ = hf_text(checkpoints["base"], ids, 16)
    stop = want[len(want) // 2 : len(want) // 2 + 3]
    assert stop and stop.strip(), want
    cut = want[: want.index(stop)]
    out = sdk(url).completions.create(
        model="base", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "never-seen"]
    )
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    stream = sdk(url, strict=False).completions.create(
        model="base", prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True
    )
    pieces = list(stream)
    assert "".join(c.choices[0].text for c in pieces) == cut
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_n_choices_with_seeds(served) -> None:
    _, url, _, _ = served
    ask = {"model": "base", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 7}
    a = sdk(url).completions.create(n=2, **ask)
    b = sdk(url).completions.create(n=2, **ask)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # reproducible
    assert a.choices[0].text != a.choices[1].text  # choice i samples with seed + i
    single = sdk(url).completions.create(n=1, **{**ask, "seed": 8})
    assert single.choices[0].text == a.choices[1].text
    assert 2 <= a.usage.completion_tokens <= 16
    # streamed, the choices interleave by index and add up to the same texts
    chat = {
        "model": "ft",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 3,
    }
    whole = sdk(url).chat.completions.create(n=2, **chat)
    texts = ["", ""]
    for chunk in sdk(url).chat.completions.create(n=2, stream=True, **chat):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in whole.choices]


def test_logprobs_of_generated_tokens_equal_hf(served, checkpoints) -> None:
    _, url, _, _ = served
    ckpt = checkpoints["ft"]
    ids = tokenizer(ckpt)(PROMPT).input_ids
    out = sdk(url).completions.create(
        model="ft", prompt=ids, max_tokens=6, temperature=0, logprobs=3
    )
    gen = hf_greedy(ckpt, ids, 6)
    ref = hf_logprobs(ckpt, ids + gen)
    lp = out.choices[0].logprobs
    for i, got in enumerate(lp.token_logprobs):
        pos = len(ids) - 1 + i
        assert got == pytest.approx(float(ref[pos, gen[i]]), abs=1e-4)
        top = torch.topk(ref[pos], 3).values.tolist()
        # keyed by token text, as OpenAI's: ids that decode alike share one entry
        alts = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert 1 <= len(alts) <= 3 and alts[0] == pytest.approx(top[0], abs=1e-4)
        assert all(min(abs(a - t) for t in top) < 1e-4 for a in alts)
    chat = sdk(url).chat.completions.create(
        model="ft",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(
        len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content
    )


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_equal_hf_teacher_forcing(served, checkpoints, max_tokens) -> None:
    _, url, _, _ = served
    ckpt = checkpoints["base"]
    ids = tokenizer(ckpt)(PROMPT + " and more words").input_ids
    # not strict: the SDK models token_logprobs as list[float], but the first prompt token has
    # none: null, as in OpenAI's own answers (and vLLM's)
    out = sdk(url, strict=False).completions.create(
        model="base", prompt=ids, max_tokens=max_tokens, temperature=0, echo=True, logprobs=1
    )
    lp = out.choices[0].logprobs
    ref = hf_logprobs(ckpt, ids)
    assert len(lp.token_logprobs) == len(ids) + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)
    for i in range(1, len(ids)):  # top-1 alternative: HF's argmax at the position before
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    assert out.choices[0].text.startswith(tokenizer(ckpt).decode(ids, skip_special_tokens=True))
    assert out.usage.completion_tokens == max_tokens


def test_errors_map_to_the_sdk_exceptions(served) -> None:
    _, url, keyed, keys = served
    client = sdk(url)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt="x", max_tokens=2, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_position_embeddings"):
        client.completions.create(model="base", prompt=[5] * 500, max_tokens=100)
    # a body FastAPI would answer with its 422 shape: OpenAI's 400 here
    status, body = post(url + "/completions", b'{"model": "base", "prompt": 3')
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = post(url + "/completions", json.dumps({"model": "base"}).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    # keys: 401 without or with a wrong one; another tenant's model is "not found"; 429
    with pytest.raises(openai.AuthenticationError):
        sdk(keyed, "sk-blockllm-wrong").models.list()
    status, body = post(keyed + "/completions", b'{"model": "base", "prompt": "x"}')
    assert status == 401 and body["error"]["type"] == "authentication_error"
    alice, bob = sdk(keyed, keys["alice"]), sdk(keyed, keys["bob"])
    assert [m.id for m in alice.models.list().data] == ["base"]
    assert {m.id for m in bob.models.list().data} == {"base", "ft"}
    with pytest.raises(openai.NotFoundError) as hidden:
        alice.completions.create(model="ft", prompt="x", max_tokens=1)
    with pytest.raises(openai.NotFoundError) as unknown:
        alice.completions.create(model="zz", prompt="x", max_tokens=1)
    assert hidden.value.message.replace("ft", "zz") == unknown.value.message
    for _ in range(3):  # rpm = 3
        alice.completions.create(model="base", prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError):
        alice.completions.create(model="base", prompt="x", max_tokens=1)
    bob.completions.create(model="ft", prompt="x", max_tokens=1)  # other keys unaffected


def post(url: str, data: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_concurrent_async_streams_to_several_tenants(served, checkpoints) -> None:
    _, url, _, _ = served
    prompts = [PROMPT, "Split the string", "Return the value of", "the parser"]
    jobs = [(m, p) for m in ("base", "ft") for p in prompts]

    async def one(client: Any, model: str, prompt: str) -> str:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_of() -> list[str]:
        async with async_sdk(url, strict=False) as client:  # completions chunks: see sdk()
            return await asyncio.gather(*(one(client, m, p) for m, p in jobs))

    got = asyncio.run(asyncio.wait_for(all_of(), 120))
    for (model, prompt), text in zip(jobs, got, strict=True):
        ids = tokenizer(checkpoints[model])(prompt).input_ids
        assert text == hf_text(checkpoints[model], ids, 10)[0], (model, prompt)


def test_disconnect_mid_stream_cancels_at_the_broker(served, checkpoints) -> None:
    c, url, _, _ = served
    ids = tokenizer(checkpoints["base"])(PROMPT).input_ids
    assert 1 not in hf_greedy(checkpoints["base"], ids, 300)  # no EOS: it would run 300 tokens
    with c.client() as native:
        before = native.status()["counters"]["cancelled"]
        stream = sdk(url, strict=False).completions.create(
            model="base", prompt=ids, max_tokens=300, temperature=0, stream=True
        )
        for i, _chunk in enumerate(stream):
            if i == 2:
                break
        stream.close()  # the TCP connection goes: the server cancels the request
        before = wait_cancelled_and_freed(native, before)
        # not streamed: the server watches the connection while it collects the answer
        body = json.dumps({"model": "base", "prompt": ids, "max_tokens": 300, "temperature": 0})
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        host, port = url.split("//")[1].split("/")[0].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall((head + body).encode())
            wait_for(native, lambda st: st["requests"]["running"] >= 1)
        wait_cancelled_and_freed(native, before)


def wait_for(native: Any, ok: Any, timeout: float = 20.0) -> dict[str, Any]:
    """Poll the broker's STATUS until ok(status) or the deadline (an assertion error)."""
    deadline = time.monotonic() + timeout
    while True:
        status = native.status()
        if ok(status):
            return status
        assert time.monotonic() < deadline, status["counters"]
        time.sleep(0.05)  # polling the broker's state with a deadline


def wait_cancelled_and_freed(native: Any, before: int) -> int:
    """Until the broker counted a CANCEL after `before`, runs nothing and every KV byte is
    free again; the cancelled counter then."""

    def done(st: dict[str, Any]) -> bool:
        idle = st["requests"]["running"] == 0 and st["requests"]["waiting"] == 0
        freed = all(w["kv_free_bytes"] == w["kv_total_bytes"] for w in st["workers"])
        return st["counters"]["cancelled"] > before and idle and freed

    return int(wait_for(native, done)["counters"]["cancelled"])


def test_health_and_metrics(served) -> None:
    _, url, _, _ = served
    root = url.removesuffix("/v1")
    with urllib.request.urlopen(root + "/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    with urllib.request.urlopen(root + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'blockllm_http_requests_total{endpoint="completions",model="base",status="200"}' in text
    assert "blockllm_http_time_to_first_token_seconds_bucket" in text


def test_http_command_warns_when_open_off_loopback(served) -> None:
    """127.0.0.2 is a loopback address the check does not know: it stands for any interface
    without ever leaving this machine."""
    c = served[0]
    cmd = [*BLOCKLLM, "http", "--broker", c.endpoint, "--bind", "127.0.0.2:0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line(proc, 120)
        assert line.startswith("blockllm: OpenAI-compatible API at http://127.0.0.2:"), line
        url = line.split()[4]
        with urllib.request.urlopen(url + "/models", timeout=10) as r:
            assert {m["id"] for m in json.loads(r.read())["data"]} == {"base", "ft"}
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "without --api-keys" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
