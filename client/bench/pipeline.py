"""`blockllm bench pipeline`: generation tokens/s through the multi-process pipeline (broker +
workers, as `blockllm serve` runs them) against the stage engine driven in-process on the same
checkpoint, at 1 stream and at N concurrent streams.

Both sides run the same greedy requests (one prompt, `--new-tokens` each) and are timed from
the first request sent to the last token received, prefill included; the in-process side
batches all its streams into each engine step (its best case). By default the comparison is at
equal cores: the in-process engine gets as many torch threads as all the workers together
(`--inprocess-threads` to choose). `--device cuda` runs both sides on the GPU.
`--breakdown` adds, per stream count, where a decode token's time goes in the pipeline
(client/bench/breakdown.py): ms per token per phase, per worker and in the broker.
Result (stdout, --json):
    {"bench": "pipeline", "model": ..., "workers": 2, "threads_per_worker": ...,
     "results": [{"streams": 1, "pipeline_tok_s": ..., "inprocess_tok_s": ..., "ratio": ...,
                  "breakdown": {...} (with --breakdown: breakdown.per_token's)},
                 {"streams": 16, ...}],
     "concurrency_speedup": pipeline tok/s at the most streams / at 1 stream}
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT = "The history of the Roman Empire began when"


@dataclass(frozen=True, slots=True)
class PipelineBenchConfig:
    model_dir: Path
    zoo_dir: Path
    streams: tuple[int, ...] = (1, 16)
    new_tokens: int = 32
    workers: int = 2
    threads_per_worker: int | None = None  # None: the usable cores split across the workers
    inprocess_threads: int | None = None  # None: as many as each worker
    kv_budget_bytes: int = 256 << 20
    ready_timeout_s: float = 300.0
    device: str = "cpu"  # of the workers and of the in-process engine
    breakdown: bool = False  # where a decode token's time goes (client/bench/breakdown.py)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # progress: stderr, results: the caller's


def _import(cfg: PipelineBenchConfig) -> str:
    """The checkpoint in the bench zoo (imported once; the name follows the folder)."""
    from blockllm.zoo import Zoo

    zoo = Zoo(cfg.zoo_dir)
    name = "bench-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in cfg.model_dir.name)
    if not zoo.has_model(name):
        _say(f"importing {cfg.model_dir} into {cfg.zoo_dir} as {name}")
        zoo.import_checkpoint(cfg.model_dir, name)
    return name


def _prompt_ids(cfg: PipelineBenchConfig) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model_dir)(PROMPT).input_ids


# -- in-process: the engine alone ----------------------------------------------------------


def inprocess_rates(cfg: PipelineBenchConfig, model: str, ids: list[int]) -> dict[int, float]:
    """tokens/s of the engine (one Worker, all stages, this process) for each stream count."""
    import torch

    from blockllm.worker.items import WorkerConfig
    from blockllm.worker.worker import Worker
    from blockllm.zoo import Zoo

    threads = _inprocess_threads(cfg)
    zoo = Zoo(cfg.zoo_dir)
    chain = len(zoo.manifest(model).chain)
    wcfg = WorkerConfig(kv_budget_bytes=cfg.kv_budget_bytes, threads=threads, device=cfg.device)
    engine = Worker(zoo, wcfg)
    key = engine.load_stage(model, 0, chain).key
    prompt = torch.tensor(ids)
    _engine_generate(engine, key, prompt, 1, 4)  # warm-up
    rates = {}
    for n in cfg.streams:
        tokens, seconds = _engine_generate(engine, key, prompt, n, cfg.new_tokens)
        rates[n] = tokens / seconds
        _say(f"in-process  {n:3d} streams: {rates[n]:8.1f} tok/s ({threads} threads)")
    del engine
    gc.collect()
    return rates


def _engine_generate(engine: Any, key: str, prompt: Any, streams: int, new: int):
    """Greedy-generate `new` tokens for `streams` copies of `prompt`, batched in each step."""
    import torch

    from blockllm.worker.items import WorkItem

    rids = [f"b{streams}-{i}" for i in range(streams)]
    total = len(prompt) + new
    t0 = time.perf_counter()
    inputs = {r: prompt for r in rids}
    past = 0
    for step in range(new):
        for r in rids:
            engine.submit(WorkItem(r, step, (key,), past, tokens=inputs[r], max_total_len=total))
        done = 0
        while done < streams:
            for res in engine.step():
                if res.error is not None:
                    raise RuntimeError(f"engine failed: {res.error} {res.message}")
                inputs[res.request_id] = torch.tensor([res.token_id])
                done += 1
        past += len(prompt) if step == 0 else 1
    seconds = time.perf_counter() - t0
    for r in rids:
        engine.release(r)
    return streams * new, seconds


# -- the pipeline: broker + workers processes -----------------------------------------------


def pipeline_rates(
    cfg: PipelineBenchConfig, model: str, ids: list[int], breakdowns: dict[int, Any]
) -> dict[int, float]:
    """tokens/s through broker + workers (static placement), for each stream count; with
    `cfg.breakdown`, each count's per-token breakdown goes into `breakdowns`."""
    from blockllm.broker.config import BrokerConfig
    from blockllm.client.bench import breakdown
    from blockllm.client.client import Client
    from blockllm.client.launcher import Launcher, ServeConfig, default_threads, plan_workers
    from blockllm.worker.config import WorkerProcConfig

    threads = cfg.threads_per_worker or default_threads(cfg.workers)
    serve = ServeConfig(str(cfg.zoo_dir), None, None, workers=cfg.workers, models=(model,))
    _models, plan = plan_workers(serve)
    with Launcher(log_level="WARNING") as launcher:
        broker = BrokerConfig(
            bind="tcp://127.0.0.1:0", zoo_dir=str(cfg.zoo_dir), log_level="WARNING"
        )
        endpoint = launcher.start_broker(broker, cfg.ready_timeout_s)
        for i, stages in enumerate(p for p in plan if p):
            wcfg = WorkerProcConfig(
                broker=endpoint,
                zoo_dir=str(cfg.zoo_dir),
                stages=stages,
                name=f"bench-{i}",
                threads=threads,
                kv_budget_bytes=cfg.kv_budget_bytes,
                device=cfg.device,
            )
            launcher.start_worker(f"bench-{i}", wcfg)
        launcher.wait_ready([model], cfg.ready_timeout_s)
        rates = {}
        with Client(endpoint, timeout=600) as client:
            warm = client.generate(model, input_ids=ids, max_new_tokens=4)
            decoded = len(warm.token_ids) - 1  # decode items each worker ran so far
            for n in cfg.streams:
                before = breakdown.settled(client, decoded) if cfg.breakdown else None
                run = _client_generate(client, model, ids, n, cfg.new_tokens)
                rates[n] = run.tokens / run.seconds
                decoded += run.decode_tokens
                if before is not None:
                    after = breakdown.settled(client, decoded)
                    b = breakdown.per_token(before, after, run.decode_tokens, run.interval_s)
                    breakdowns[n] = b
                    _say(breakdown.table(n, b))
                _say(
                    f"pipeline    {n:3d} streams: {rates[n]:8.1f} tok/s "
                    f"({cfg.workers} workers x {threads} threads)"
                )
    return rates


@dataclass(frozen=True, slots=True)
class ClientRun:
    tokens: int  # received, all streams
    seconds: float  # first request sent -> last token received
    decode_tokens: int  # tokens after each stream's first
    interval_s: float  # mean time between two tokens of a stream (decode tokens only)


def _client_generate(
    client: Any, model: str, ids: Sequence[int], streams: int, new: int
) -> ClientRun:
    """`streams` concurrent streams from threads, each token's arrival timed."""
    times: list[list[float]] = [[] for _ in range(streams)]
    errors: list[BaseException] = []
    start = threading.Barrier(streams + 1)

    def run(i: int) -> None:
        try:
            start.wait()
            for _event in client.stream(model, input_ids=ids, max_new_tokens=new):
                times[i].append(time.perf_counter())
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    decode = sum(len(t) - 1 for t in times if t)
    spans = sum(t[-1] - t[0] for t in times if t)
    return ClientRun(sum(len(t) for t in times), seconds, decode, spans / max(decode, 1))


def run_pipeline_bench(cfg: PipelineBenchConfig) -> dict[str, Any]:
    model = _import(cfg)
    ids = _prompt_ids(cfg)
    inproc = inprocess_rates(cfg, model, ids)
    breakdowns: dict[int, Any] = {}
    pipe = pipeline_rates(cfg, model, ids, breakdowns)
    results = [
        {
            "streams": n,
            "pipeline_tok_s": round(pipe[n], 2),
            "inprocess_tok_s": round(inproc[n], 2),
            "ratio": round(pipe[n] / inproc[n], 3),
            **({"breakdown": breakdowns[n]} if n in breakdowns else {}),
        }
        for n in cfg.streams
    ]
    lo, hi = min(cfg.streams), max(cfg.streams)
    return {
        "bench": "pipeline",
        "model": str(cfg.model_dir),
        "workers": cfg.workers,
        "threads_per_worker": cfg.threads_per_worker or _default_threads(cfg.workers),
        "inprocess_threads": _inprocess_threads(cfg),
        "device": cfg.device,
        "new_tokens": cfg.new_tokens,
        "prompt_tokens": len(ids),
        "results": results,
        "concurrency_speedup": round(pipe[hi] / pipe[lo], 3),
    }


def _inprocess_threads(cfg: PipelineBenchConfig) -> int:
    """Equal cores by default: as many threads as all the workers together."""
    per_worker = cfg.threads_per_worker or _default_threads(cfg.workers)
    return cfg.inprocess_threads or per_worker * cfg.workers


def _default_threads(workers: int) -> int:
    from blockllm.client.launcher import default_threads

    return default_threads(workers)
