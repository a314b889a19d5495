"""KV migration vs replay, measured: bytes moved and milliseconds for a request's move.

    python -m blockllm.client.bench.kv_migration --zoo DIR --model NAME \
        [--prompt-tokens 512] [--threads 1] [--json]

- engine: two in-process `Worker`s host the model's upper stage; a request prefilled on A is
  moved to B by `export_kv` -> frames encode/decode (what crosses the broker) -> `import_kv`,
  vs B re-prefilling prompt + generated tokens (what a replay costs that stage);
- cluster: a broker and workers w0 (lower half), w1 and w2 (upper half); a running request
  moves its upper stage w1 -> w2 after 3 tokens, once with KV migration and once with the
  replay move (`BrokerConfig.kv_migration=False`); the token gap at the move, the median gap,
  and the bytes that crossed the broker for the move (migration: the shard, counted by the
  broker; replay: token ids + the hidden states of the re-prefill, w0 -> broker -> w2).
Not a pytest module: a harness around the test helpers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from blockllm.broker import frames
from blockllm.broker.planner.proc import send_command
from blockllm.broker.protocol import KvShard, PlannedHop, PlannedRoute, SetRoutes
from blockllm.client.launcher.local import local_cluster


def engine_level(zoo: Path, model: str, n: int, threads: int) -> dict[str, Any]:
    from blockllm.worker.worker import Worker, WorkerConfig, WorkItem
    from blockllm.zoo import Zoo

    torch.set_num_threads(threads)
    cfg = WorkerConfig(device="cpu", kv_budget_bytes=256 << 20, threads=threads)
    a, b = Worker(Zoo(zoo), cfg), Worker(Zoo(zoo), cfg)
    m = Zoo(zoo).manifest(model)
    half, end = len(m.chain) // 2, len(m.chain)
    key = a.load_stage(model, half, end).key
    b.load_stage(model, half, end)
    hidden = torch.randn(n, m.config["hidden_size"]).to(getattr(torch, m.dtype))

    def prefill(w: Any, rid: str) -> float:
        t0 = time.perf_counter()
        w.submit(WorkItem(rid, 1, (key,), 0, hidden=hidden, max_total_len=n + 64))
        (res,) = w.step()
        assert res.error is None, res.message
        return (time.perf_counter() - t0) * 1000

    prefill(a, "warm")
    prefill(a, "r")
    replay_ms = min(prefill(b, f"p{i}") for i in range(3))
    times, nbytes = [], 0
    for i in range(5):
        t0 = time.perf_counter()
        k, v = a.export_kv("r", key, n)
        shard = KvShard(1, "r", key, n, n + 64, (frames.meta_of(k), frames.meta_of(v)))
        wire = [bytes(f) for f in frames.encode(shard, (k, v))]  # the bytes that cross
        _msg, (k2, v2) = frames.decode(wire)
        b.import_kv(f"m{i}", key, k2.clone(), v2.clone(), n + 64)  # the IO thread copies
        times.append((time.perf_counter() - t0) * 1000)
        nbytes = sum(len(f) for f in wire)
    return {
        "stage": [half, end],
        "tokens": n,
        "migrate_ms": min(times),
        "migrate_bytes": nbytes,
        "replay_prefill_ms": replay_ms,
        "replay_bytes": n * m.config["hidden_size"] * hidden.element_size(),
    }


def cluster_level(zoo: Path, model: str, n: int, threads: int, migrate: bool) -> dict[str, Any]:
    from blockllm.zoo import Zoo

    m = Zoo(zoo).manifest(model)
    half, end = len(m.chain) // 2, len(m.chain)
    prompt = [(37 * i) % 40000 + 100 for i in range(n)]
    workers = {"w0": [f"{model}:0-{half}"], "w1": [f"{model}:{half}-{end}"]}
    workers["w2"] = workers["w1"]
    kw = {w: {"threads": threads, "kv_budget_bytes": 256 << 20} for w in workers}
    broker = {"kv_migration": migrate, "hedge_after_s": 0.0, "default_timeout_s": 600.0}

    def routes(second: str) -> SetRoutes:
        hops = (PlannedHop("w0", ((0, half),)), PlannedHop(second, ((half, end),)))
        return SetRoutes(f"to-{second}", {model: (PlannedRoute(hops, 1.0),)}, True)

    with local_cluster(zoo, workers, [model], broker=broker, worker_kw=kw, ready_timeout=300) as c:
        assert send_command(c.endpoint, routes("w1")).ok
        stamps: list[float] = []
        moved_at = 0
        with c.client(timeout=600) as client:
            stream = client.stream(model, input_ids=prompt, max_new_tokens=16, timeout=600)
            for k, _ev in enumerate(stream):
                stamps.append(time.perf_counter())
                if k == 2:
                    assert send_command(c.endpoint, routes("w2")).ok
                    moved_at = k
            counters = client.status(timeout=10)["counters"]
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
    after = gaps[moved_at:]
    hidden = m.config["hidden_size"] * torch.empty((), dtype=getattr(torch, m.dtype)).element_size()
    held = n + moved_at + 1  # tokens a replay re-prefills
    return {
        "mode": "migrate" if migrate else "replay",
        "move_gap_ms": max(after),
        "median_gap_ms": statistics.median(gaps),
        "bytes_through_broker": counters["migrated_bytes"] * 2  # in and out of the broker
        if migrate
        else 2 * (8 * held + held * hidden),
        "migrations": counters["migrations"],
        "replays_or_moves": counters["moved"] - counters["migrations"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-cluster", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    out: dict[str, Any] = {"engine": engine_level(a.zoo, a.model, a.prompt_tokens, a.threads)}
    if not a.skip_cluster:
        out["cluster"] = [
            cluster_level(a.zoo, a.model, a.prompt_tokens, a.threads, migrate)
            for migrate in (True, False)
        ]
    if a.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        for k, v in out.items():
            print(k, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
