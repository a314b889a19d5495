"""What the planner buys, measured: closed-loop clients against broker + workers on this machine.

    python -m blockllm.client.bench.planner --zoo DIR --models base,ft \
        --mode off|placement|dups [--straggler-delay 0.1] [--clients 4] [--min-gain G] [--json]

- off: static placement (what `blockllm serve --no-planner` starts), no planner;
- placement: the planner places by demand (no duplicates);
- dups: placement + straggler duplicates (and the broker's hedged steps, always on).
`--straggler-delay S` slows every step of the last worker by S seconds (the test-only fault
hook). Clients alternate models and stream greedy requests; after `--warmup` seconds (the
planner adapts meanwhile) per-token latency (TPOT), time to first token and tokens/s are
measured for `--duration` seconds. `--min-gain -1` makes the planner take every demand
re-placement (the rule before min_gain existed). Not a pytest module: a harness around the
test helpers.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from blockllm.broker.planner.config import PlannerConfig
from blockllm.client.launcher import ServeConfig, plan_workers
from blockllm.client.launcher.local import local_cluster

PROMPTS = [[(17 * i + 31 * k) % 40000 + 100 for k in range(24)] for i in range(16)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Load:
    """Closed-loop clients; samples recorded only while `measuring` is set."""

    def __init__(self, c: Any, models: list[str], clients: int, tokens: int) -> None:
        self.c, self.models, self.tokens = c, models, tokens
        self.measuring = threading.Event()
        self.stop = threading.Event()
        self.tpot: list[float] = []
        self.ttft: list[float] = []
        self.generated = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(clients)]

    def run(self, i: int) -> None:
        with self.c.client(timeout=300) as client:
            n = i
            while not self.stop.is_set():
                model = self.models[n % len(self.models)]
                prompt = PROMPTS[n % len(PROMPTS)]
                n += len(self.threads)
                t0 = last = time.monotonic()
                try:
                    for k, _ in enumerate(
                        client.stream(model, input_ids=prompt, max_new_tokens=self.tokens)
                    ):
                        now = time.monotonic()
                        if self.measuring.is_set():
                            (self.ttft if k == 0 else self.tpot).append(
                                now - (t0 if k == 0 else last)
                            )
                            self.generated += 1
                        last = now
                except Exception as e:  # counted and reported
                    self.errors.append(repr(e))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--models", default="base,ft")
    ap.add_argument("--mode", choices=("off", "placement", "dups"), default="placement")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--straggler-delay", type=float, default=0.0)
    ap.add_argument("--min-gain", type=float, default=PlannerConfig().min_gain)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    models = a.models.split(",")
    _, plan = plan_workers(ServeConfig(a.zoo, None, None, workers=a.workers, models=tuple(models)))
    workers = {f"w{i}": [str(s) for s in st] for i, st in enumerate(plan) if st}
    last = sorted(workers)[-1]
    kw = {w: {"threads": 1, "kv_budget_bytes": 256 << 20} for w in workers}
    kw[last]["fault_step_delay_s"] = a.straggler_delay
    with local_cluster(
        Path(a.zoo),
        workers,
        models,
        ready_timeout=300,
        worker_kw=kw,
        broker={"stats_interval_s": 0.5},
    ) as c:
        if a.mode != "off":
            c.launcher.start_planner(
                PlannerConfig(
                    broker=c.endpoint,
                    zoo_dir=a.zoo,
                    replan_interval_s=3.0,
                    duplicates=a.mode == "dups",
                    log_level="WARNING",
                    min_gain=a.min_gain,
                )
            )
        load = Load(c, models, a.clients, a.tokens)
        for t in load.threads:
            t.start()
        time.sleep(a.warmup)  # the planner adapts to the load meanwhile (not a synchronisation)
        load.measuring.set()
        t0 = time.monotonic()
        time.sleep(a.duration)
        load.measuring.clear()
        elapsed = time.monotonic() - t0
        load.stop.set()
        for t in load.threads:
            t.join(300)
        with c.client() as client:
            status = client.status()
    result = {
        "mode": a.mode,
        "straggler_delay_s": a.straggler_delay,
        "min_gain": a.min_gain,
        "clients": a.clients,
        "tokens_per_s": round(load.generated / elapsed, 2),
        "tpot_ms_p50": round(pct(load.tpot, 0.5) * 1000, 1),
        "tpot_ms_p95": round(pct(load.tpot, 0.95) * 1000, 1),
        "ttft_ms_p95": round(pct(load.ttft, 0.95) * 1000, 1),
        "errors": len(load.errors),
        "routes": {m: s["route"] for m, s in status["models"].items()},
        "stages": {
            w["name"]: [f"{s['model']}:{s['start']}-{s['end']}" for s in w["stages"]]
            for w in status["workers"]
        },
        "counters": {k: v for k, v in status["counters"].items() if v},
    }
    print(json.dumps(result) if a.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
