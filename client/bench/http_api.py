"""What the HTTP layer costs (`blockllm bench http`, client/cli/bench.py). The same
closed-loop workload (S concurrent streams, greedy, token-id prompts, tenants round-robin) runs
against one cluster through the native `AsyncClient` and through `POST /v1/completions` with
`stream: true` (a minimal asyncio HTTP/1.1 reader, so the client side costs as little as the
native one), in alternating rounds after a warm-up; reported: TTFT and inter-token latency
p50/p95 and tokens/s of each, and the HTTP cost against the goals (<= 5% tokens/s, <= 10 ms
TTFT p50).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Say = Callable[[str], None]
GOALS = {"tokens_per_s_cost_max": 0.05, "ttft_p50_cost_ms_max": 10.0}


@dataclass(frozen=True, slots=True)
class HttpBenchConfig:
    quick: bool = False  # a tiny random family instead of SmolLM2
    variants: int = 3
    streams: int = 16
    requests: int = 64  # per round and system
    rounds: int = 2
    prompt_tokens: tuple[int, int] = (16, 48)
    new_tokens: tuple[int, int] = (16, 48)
    workers: int = 2
    seed: int = 0
    cache_dir: Path | None = None


@dataclass
class Sample:
    """One request: when it started, when each streamed piece arrived, tokens generated."""

    t0: float
    times: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def end(self) -> float:
        return self.times[-1] if self.times else self.t0


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summarize(samples: Sequence[Sample], wall_s: float) -> dict[str, Any]:
    ttft = [(s.times[0] - s.t0) * 1000 for s in samples if s.times]
    itl = [(b - a) * 1000 for s in samples for a, b in zip(s.times, s.times[1:], strict=False)]
    tokens = sum(s.tokens for s in samples)

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 2)

    return {
        "requests": len(samples),
        "tokens": tokens,
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        "ttft_p50_ms": r(_pct(ttft, 0.5)),
        "ttft_p95_ms": r(_pct(ttft, 0.95)),
        "itl_p50_ms": r(_pct(itl, 0.5)),
        "itl_p95_ms": r(_pct(itl, 0.95)),
    }


async def native_one(client: Any, model: str, ids: list[int], n: int) -> Sample:
    s = Sample(time.perf_counter())
    async for _ev in client.stream(model, input_ids=ids, max_new_tokens=n):
        s.times.append(time.perf_counter())
    s.tokens = len(s.times)
    return s


async def http_one(host: str, port: int, model: str, ids: list[int], n: int) -> Sample:
    """One streamed completion over a fresh connection, read with asyncio streams."""
    body = json.dumps(
        {
            "model": model,
            "prompt": ids,
            "max_tokens": n,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    s = Sample(time.perf_counter())
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body)
        )
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"HTTP API answered {status!r}")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # headers (the body is chunked)
        buf = b""
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                break
            buf += await reader.readexactly(size + 2)
            buf = buf[:-2] if buf.endswith(b"\r\n") else buf
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                _event(s, event)
    finally:
        writer.close()
    return s


def _event(s: Sample, event: bytes) -> None:
    data = event.removeprefix(b"data: ")
    if data == b"[DONE]":
        return
    doc = json.loads(data)
    if doc.get("usage"):
        s.tokens = doc["usage"]["completion_tokens"]
    if doc.get("choices"):
        s.times.append(time.perf_counter())


def workload(
    cfg: HttpBenchConfig, models: Sequence[str], vocab: int
) -> list[tuple[str, list[int], int]]:
    rng = random.Random(cfg.seed)
    out = []
    for i in range(cfg.requests):
        n_prompt = rng.randint(*cfg.prompt_tokens)
        out.append(
            (
                models[i % len(models)],
                [rng.randrange(3, vocab) for _ in range(n_prompt)],
                rng.randint(*cfg.new_tokens),
            )
        )
    return out


async def closed_loop(
    one: Callable[[str, list[int], int], Any],
    jobs: Sequence[tuple[str, list[int], int]],
    streams: int,
) -> tuple[list[Sample], float]:
    """Run `jobs` with `streams` in flight at all times; (samples, wall seconds)."""
    queue: asyncio.Queue[tuple[str, list[int], int]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    samples: list[Sample] = []

    async def worker() -> None:
        while not queue.empty():
            samples.append(await one(*queue.get_nowait()))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    return samples, time.perf_counter() - t0


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0 when unknown)."""
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except (psutil.Error, ValueError):
        return 0.0
    return t.user + t.system


async def _measure(
    cfg: HttpBenchConfig,
    endpoint: str,
    url: str,
    models: Sequence[str],
    vocab: int,
    say: Say,
    http_pid: int | None = None,
) -> dict[str, Any]:
    from urllib.parse import urlparse

    from blockllm.client.aio import AsyncClient

    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    jobs = workload(cfg, models, vocab)
    results: dict[str, list[tuple[list[Sample], float]]] = {"native": [], "http": []}
    http_cpu = 0.0
    async with AsyncClient(endpoint, timeout=600) as client:
        systems = {
            "native": lambda m, ids, n: native_one(client, m, ids, n),
            "http": lambda m, ids, n: http_one(host, port, m, ids, n),
        }
        warm = jobs[: cfg.streams]
        for name, one in systems.items():
            say(f"warm-up: {len(warm)} requests through {name}")
            await closed_loop(one, warm, cfg.streams)
        for r in range(cfg.rounds):
            for name, one in systems.items():
                cpu0 = _cpu_s(http_pid)
                samples, wall = await closed_loop(one, jobs, cfg.streams)
                if name == "http":
                    http_cpu += _cpu_s(http_pid) - cpu0
                results[name].append((samples, wall))
                say(
                    f"round {r + 1}/{cfg.rounds} {name}: "
                    f"{sum(s.tokens for s in samples) / wall:.1f} tokens/s"
                )
    doc: dict[str, Any] = {}
    for name, runs in results.items():
        doc[name] = summarize(
            [s for samples, _ in runs for s in samples], sum(wall for _, wall in runs)
        )
    tokens = doc["http"]["tokens"]
    # CPU the HTTP process spent per generated token (its whole cost, whatever the load)
    doc["http"]["server_cpu_ms_per_token"] = round(1000 * http_cpu / tokens, 3) if tokens else None
    return doc


def run_http_bench(cfg: HttpBenchConfig, say: Say) -> dict[str, Any]:
    """Prepare the family, start broker + workers + the HTTP API, measure both paths."""
    from blockllm.client.bench.family import FamilySpec, prepare_family
    from blockllm.client.bench.systems import ClusterSpec, start_cluster
    from blockllm.client.http.config import HttpConfig
    from blockllm.client.launcher import Launcher
    from blockllm.zoo import Zoo

    cache = cfg.cache_dir or Path.home() / ".cache" / "blockllm" / "bench"
    family = prepare_family(
        FamilySpec(kind="tiny" if cfg.quick else "smollm2", variants=cfg.variants, cache_dir=cache),
        say,
    )
    models = family.names
    vocab = int(Zoo(family.zoo_dir).manifest(models[0]).config["vocab_size"])
    spec = ClusterSpec(
        zoo_dir=str(family.zoo_dir), models=models, kv_budget_bytes=256 << 20, workers=cfg.workers
    )
    load0 = os.getloadavg()[0]
    with Launcher(log_level="WARNING") as launcher:
        endpoint = start_cluster(launcher, spec)
        url = launcher.start_http(HttpConfig(broker=endpoint, port=0), 300)
        say(f"cluster at {endpoint}, HTTP API at {url}")
        pid = launcher.http.pid if launcher.http is not None else None
        doc = asyncio.run(_measure(cfg, endpoint, url, models, vocab, say, pid))
    native, http = doc["native"], doc["http"]
    cost = 1 - http["tokens_per_s"] / native["tokens_per_s"] if native["tokens_per_s"] else None
    ttft_cost = None
    if http["ttft_p50_ms"] is not None and native["ttft_p50_ms"] is not None:
        ttft_cost = round(http["ttft_p50_ms"] - native["ttft_p50_ms"], 2)
    doc["http_cost"] = {
        "tokens_per_s": None if cost is None else round(cost, 4),
        "ttft_p50_ms": ttft_cost,
    }
    doc["meta"] = {
        "family": family.kind,
        "tenants": list(models),
        "streams": cfg.streams,
        "requests_per_round": cfg.requests,
        "rounds": cfg.rounds,
        "workers": cfg.workers,
        "prompt_tokens": list(cfg.prompt_tokens),
        "new_tokens": list(cfg.new_tokens),
        "cores": os.cpu_count(),
        "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "goals": {
            "tokens_per_s_cost": {
                "value": doc["http_cost"]["tokens_per_s"],
                "max": GOALS["tokens_per_s_cost_max"],
            },
            "ttft_p50_cost_ms": {"value": ttft_cost, "max": GOALS["ttft_p50_cost_ms_max"]},
        },
    }
    return doc


def report(doc: dict[str, Any]) -> list[str]:
    """The human-readable table of a run."""
    meta = doc["meta"]
    lines = [
        f"HTTP API vs native client: {meta['family']} ({len(meta['tenants'])} tenants), "
        f"{meta['streams']} concurrent streams, {meta['requests_per_round']} requests x "
        f"{meta['rounds']} rounds each, {meta['cores']} cores, load average "
        f"{meta['load_average'][0]} -> {meta['load_average'][1]}",
        f"{'system':<8} {'tokens':>7} {'tok/s':>8} {'ttft p50':>9} {'ttft p95':>9} "
        f"{'itl p50':>8} {'itl p95':>8}  (ms)",
    ]
    for name in ("native", "http"):
        d = doc[name]
        lines.append(
            f"{name:<8} {d['tokens']:>7} {d['tokens_per_s']:>8.1f} {d['ttft_p50_ms']:>9.1f} "
            f"{d['ttft_p95_ms']:>9.1f} {d['itl_p50_ms']:>8.1f} {d['itl_p95_ms']:>8.1f}"
        )
    goals = meta["goals"]
    tps, ttft = goals["tokens_per_s_cost"], goals["ttft_p50_cost_ms"]
    met_tps = tps["value"] is not None and tps["value"] <= tps["max"]
    met_ttft = ttft["value"] is not None and ttft["value"] <= ttft["max"]
    lines.append(f"HTTP process CPU per token: {doc['http']['server_cpu_ms_per_token']} ms")
    lines.append(
        f"goal http tokens/s cost: {tps['value']:.1%} (goal <= {tps['max']:.0%}): "
        f"{'met' if met_tps else 'missed'}"
    )
    lines.append(
        f"goal http TTFT p50 cost: {ttft['value']:+.1f} ms (goal <= {ttft['max']:.0f} "
        f"ms): {'met' if met_ttft else 'missed'}"
    )
    return lines
