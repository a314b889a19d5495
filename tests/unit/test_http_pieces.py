"""The pure parts of the HTTP API: stop sequences, API keys and rate limits, request validation
into OpenAI's error shape, broker errors to HTTP statuses, the `parent` rule."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from blockllm.client.errors import BadRequest, BrokerUnavailable, Overloaded, RequestFailed
from blockllm.client.http.apikeys import (
    ApiKey,
    ApiKeysError,
    RateLimiter,
    add_api_key,
    key_hash,
    load_api_keys,
)
from blockllm.client.http.choices import StopMatcher
from blockllm.client.http.config import parse_host_port
from blockllm.client.http.errors import ApiError, from_broker
from blockllm.client.http.schemas import ChatRequest, CompletionRequest, parse
from blockllm.client.http.tenants import parents_of


def _run(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize("seed", range(20))
def test_stop_matcher_cuts_at_the_first_stop_however_the_text_is_split(seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice("ab\n.") for _ in range(40))
    stops = ["\n\n", "b.a"]
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(0, 3)
        pieces.append(text[i : i + n])
        i += n
    got, stopped = _run(StopMatcher(stops), pieces)
    assert stopped == (cut >= 0)
    assert got == (text[:cut] if cut >= 0 else text)


def test_stop_matcher_releases_text_that_cannot_start_a_stop() -> None:
    m = StopMatcher(["END"])
    assert m.push("hello E") == ("hello ", False)  # "E" may begin END: held
    assert m.push("x") == ("Ex", False)
    assert m.push("EN") == ("", False)
    assert m.push("D and more") == ("", True)


def test_api_keys_file_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    a = add_api_key(path, "a", ["m1", "m2"], rpm=2)
    b = add_api_key(path, "b", ["*"])
    keys = load_api_keys(path)
    assert a not in path.read_text() and b not in path.read_text()
    assert keys[key_hash(a)].models == ("m1", "m2") and keys[key_hash(a)].rpm == 2
    assert keys[key_hash(b)].allows("anything") and not keys[key_hash(a)].allows("m3")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ApiKeysError, match="exists already"):
        add_api_key(path, "a", ["m1"])
    for text, what in [
        ('[keys.x]\nsha256 = "00"\nmodels = ["m"]\n', "sha256"),
        ('[keys.x]\nsha256 = "' + "0" * 64 + '"\nmodels = []\n', "models"),
        ('[keys.x]\nsha256 = "' + "0" * 64 + '"\nmodels = ["m"]\nrpm = -1\n', "rpm"),
        ('[keys.x]\nsha256 = "' + "0" * 64 + '"\nmodels = ["m"]\nmodel = 1\n', "unknown"),
        ("[other]\n", "only .keys.NAME. tables"),
        ("not toml [", "TOML"),
    ]:
        path.write_text(text)
        with pytest.raises(ApiKeysError, match=what):
            load_api_keys(path)


def test_rate_limiter_is_a_sliding_minute_per_key() -> None:
    limiter = RateLimiter()
    key = ApiKey("k", "0" * 64, ("*",), rpm=2)
    other = ApiKey("o", "1" * 64, ("*",), rpm=2)
    assert limiter.admit(key, 0.0) == 0 and limiter.admit(key, 10.0) == 0
    assert limiter.admit(key, 20.0) == pytest.approx(40.0)  # the first leaves the window at 60
    assert limiter.admit(other, 20.0) == 0  # per key
    assert limiter.admit(key, 60.0) == 0  # the first one has left the window
    assert limiter.admit(ApiKey("u", "2" * 64, ("*",)), 0.0) == 0  # rpm 0: no limit


def _bad(schema: type, body: object) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse(schema, body)
    assert e.value.status == 400 and set(e.value.body()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    return e.value


def test_validation_errors_are_openai_400s_naming_the_field() -> None:
    assert _bad(CompletionRequest, {"model": "m"}).param == "prompt"
    assert _bad(CompletionRequest, {"model": "m", "prompt": "x", "n": 0}).param == "n"
    assert _bad(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 6}).param == (
        "logprobs"
    )
    assert _bad(CompletionRequest, {"model": "m", "prompt": []}).param == "prompt"
    assert _bad(CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": 0}).param == (
        "max_tokens"
    )  # only with echo
    assert _bad(CompletionRequest, {"model": "m", "prompt": "x", "stop": [""]}).param == "stop"
    assert _bad(CompletionRequest, {"model": "m", "prompt": "x", "presence_penalty": 1}).param
    assert _bad(ChatRequest, {"model": "m", "messages": []}).param == "messages"
    assert _bad(ChatRequest, {"model": "m", "messages": [{"role": "robot", "content": "x"}]})
    assert (
        _bad(ChatRequest, {"model": "m", "messages": [{"role": "user"}], "top_logprobs": 2}).param
        == "top_logprobs"
    )
    assert _bad(CompletionRequest, ["not", "an", "object"])
    ok = parse(CompletionRequest, {"model": "m", "prompt": [[1, 2], [3]], "whatever": {"x": 1}})
    assert ok.prompts() == [[1, 2], [3]] and ok.max_tokens == 16  # OpenAI's default
    assert parse(CompletionRequest, {"model": "m", "prompt": [1, 2]}).prompts() == [[1, 2]]
    chat = parse(
        ChatRequest,
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
        },
    )
    assert chat.messages[0].text() == "ab"


def test_broker_errors_become_http_statuses() -> None:
    assert from_broker(BadRequest("too long"), "m").status == 400
    assert from_broker(Overloaded("full"), "m").status == 429
    assert from_broker(BrokerUnavailable("gone"), "m").status == 503
    assert from_broker(RequestFailed("x", code="NO_ROUTE"), "m").status == 503
    assert from_broker(RequestFailed("x", code="WORKER_LOST"), "m").status == 500
    unknown = from_broker(RequestFailed("x", code="UNKNOWN_MODEL"), "m")
    assert unknown.status == 404 and unknown.param == "model"


def _manifest(chain: list[str], stamp: str = "", family: str = "f") -> dict:
    return {"chain": chain, "fingerprint": family, "source": {"imported_at": stamp}}


def test_parent_is_the_closest_more_central_model() -> None:
    base = [f"b{i}" for i in range(8)]
    ft = {f"ft{k}": [*base[:6], f"x{k}", f"y{k}"] for k in range(3)}
    other = _manifest([f"z{i}" for i in range(8)], family="g")
    parents = parents_of(
        {"base": _manifest(base), **{n: _manifest(c) for n, c in ft.items()}, "other": other}
    )
    assert parents == {"base": None, "ft0": "base", "ft1": "base", "ft2": "base", "other": None}
    # two models only: the one imported first, then the name that sorts first, is the parent
    two = {"b": _manifest(base, "2026-01-02"), "a": _manifest(ft["ft0"], "2026-01-01")}
    assert parents_of(two) == {"a": None, "b": "a"}
    same = {"smollm2": _manifest(base), "smollm2-chat": _manifest(ft["ft0"])}
    assert parents_of(same) == {"smollm2": None, "smollm2-chat": "smollm2"}


def _parents_all_pairs(manifests: dict[str, dict]) -> dict[str, str | None]:
    """The definition, every pair compared (what parents_of did before it scaled)."""
    from blockllm.client.http.tenants import _earlier

    chains = {m: set(d["chain"]) for m, d in manifests.items()}
    fam = {m: d["fingerprint"] for m, d in manifests.items()}

    def shared(a: str, b: str) -> int:
        return len(chains[a] & chains[b]) if fam[a] == fam[b] else 0

    central = {m: sum(shared(m, o) for o in chains if o != m) for m in chains}
    stamp = {m: manifests[m]["source"]["imported_at"] for m in chains}
    rank = {m: (central[m], _earlier(stamp[m]), _earlier(m)) for m in chains}
    return {
        m: max(
            (o for o in chains if o != m and shared(m, o) > 0 and rank[o] > rank[m]),
            key=lambda o: (shared(m, o), rank[o]),
            default=None,
        )
        for m in chains
    }


@pytest.mark.parametrize("size", [40, 600])
def test_parents_of_a_large_family_as_every_pair_compared(size: int) -> None:
    """A base, fine-tunes of one or two layers, fine-tunes of those, and a few full
    fine-tunes; 600 models is past EXACT_FAMILY (candidates bounded), 40 is not."""
    import random

    from blockllm.client.http.tenants import EXACT_FAMILY

    rng = random.Random(size)
    base = [f"b{i}" for i in range(12)]
    ms = {"base": _manifest(base, "2026-01-01")}
    for k in range(size):
        parent = ms[rng.choice(list(ms))]["chain"] if k % 5 == 4 else base
        chain = list(parent)
        for p in rng.sample(range(12), 12 if k % 97 == 3 else rng.choice((1, 2))):
            chain[p] = f"t{k}.{p}"
        ms[f"t{k:04d}"] = _manifest(chain, f"2026-02-{1 + k % 28:02d}")
    assert (size > EXACT_FAMILY) == (size == 600)
    assert parents_of(ms) == _parents_all_pairs(ms)


def test_host_port_parsing() -> None:
    assert parse_host_port("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_host_port(":9000") == ("127.0.0.1", 9000)
    assert parse_host_port("0.0.0.0") == ("0.0.0.0", 8000)
    assert parse_host_port("[::1]:0") == ("::1", 0)
    for bad in ("a:b", "h:70000", "[::1]x"):
        with pytest.raises(ValueError):
            parse_host_port(bad)


def test_an_uncovered_model_is_refused_only_on_a_fresh_status() -> None:
    """The view is a STATUS up to a second old: a model it shows uncovered gets one more
    STATUS round trip before the 503 (covered by now: admitted); still uncovered: 503."""
    import asyncio

    from blockllm.client.http.tenants import Tenants

    class Answers:  # the broker's STATUS answers in order (a unit test of Tenants alone)
        def __init__(self, *covered: bool) -> None:
            self.covered, self.asked = list(covered), 0

        async def status(self, timeout: float) -> dict:
            self.asked += 1
            return {"models": {"m": {"covered": self.covered.pop(0)}}}

    async def scenario(*covered: bool) -> tuple[int | None, int]:
        client = Answers(*covered)
        tenants = Tenants(client)
        await tenants.refresh()
        try:
            await tenants.check_fresh("m", True)
            return None, client.asked
        except ApiError as e:
            return e.status, client.asked

    assert asyncio.run(scenario(False, True)) == (None, 2)  # covered since the last view
    assert asyncio.run(scenario(False, False)) == (503, 2)  # still not: refused
    assert asyncio.run(scenario(True)) == (None, 1)  # the fast path asks nothing more
