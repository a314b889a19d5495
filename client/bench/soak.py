"""`blockllm bench soak`: a bounded soak, optionally with seeded chaos, checked token by token.

A local cluster (broker, planner with `max_spawn`, `workers` workers each holding every
model) serves several tenants under a steady closed-loop load of `streams` clients for
`minutes`; every completion is compared with HF `generate` (greedy, computed once per prompt
from the zoo's own export). With chaos, faults come at seeded times, spread over the run (none
in its first tenth or last sixth): SIGKILL a worker (then started again, as systemd would),
SIGSTOP a worker for 1-3 s, SIGKILL the planner and start a new one, SIGKILL the broker and
start a new one on the same address (workers and clients reconnect by themselves).

Reported: requests completed, failed (by typed error), lost (a client gave up waiting: the
request was accepted and never answered), wrong (tokens differ from HF's), per fault its
recovery time (from the fault until a request started after the fault was over completes;
p50 and max), and the RSS of every long-lived process at the end of the first minute (or a
quarter of the run) and at the end, with its growth.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

PROMPTS = ([11, 23, 5, 77, 140, 9], [3, 14, 15, 92, 65], [27, 18, 28, 45, 90], [99, 1, 42])
FAULTS = ("kill_worker", "stop_worker", "restart_planner", "restart_broker")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class SoakConfig:
    zoo: str
    models: tuple[str, ...]
    minutes: float = 5.0
    chaos: bool = False
    seed: int = 0
    streams: int = 4
    workers: int = 3
    max_new_tokens: int = 16
    request_timeout_s: float = 60.0
    faults_per_kind: int = 1
    faults: tuple[str, ...] = FAULTS  # the kinds injected with chaos


@dataclass
class Tally:
    completed: int = 0
    wrong: int = 0
    lost: int = 0
    failed: Counter = field(default_factory=Counter)
    done_at: list[tuple[float, float]] = field(default_factory=list)  # (started, finished)
    lock: threading.Lock = field(default_factory=threading.Lock)


def references(zoo_dir: str, models: Sequence[str], n: int) -> dict[tuple[str, int], list[int]]:
    """HF greedy continuations of every (model, prompt), from the zoo's export of each model."""
    import torch
    from transformers import AutoModelForCausalLM

    from blockllm.zoo import Zoo

    out = {}
    with tempfile.TemporaryDirectory(prefix="soak-ref-") as tmp:
        for name in models:
            path = Zoo(zoo_dir).export(name, Path(tmp) / name)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for i, p in enumerate(PROMPTS):
                ids = torch.tensor([p])
                with torch.inference_mode():
                    got = model.generate(
                        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
                    )
                out[(name, i)] = got[0, len(p) :].tolist()
    return out


class Soak:
    """One run: the cluster, the load threads, the chaos schedule (see the module docstring)."""

    def __init__(self, cfg: SoakConfig, progress: Progress) -> None:
        from blockllm.client.launcher import Launcher

        self.cfg = cfg
        self.progress = progress
        self.launcher = Launcher(log_level="ERROR", stop_timeout=15.0)
        self.tally = Tally()
        self.faults: list[dict[str, Any]] = []
        self.stop = threading.Event()

    # -- the cluster ---------------------------------------------------------------------------
    def start(self) -> None:
        from blockllm.broker.config import BrokerConfig
        from blockllm.client.launcher.local import FAST_BEAT_S, worker_config
        from blockllm.zoo import Zoo

        self.bcfg = BrokerConfig(
            bind="tcp://127.0.0.1:0", zoo_dir=self.cfg.zoo, heartbeat_s=FAST_BEAT_S
        )
        self.endpoint = self.launcher.start_broker(self.bcfg, 60.0)
        self.bcfg = replace(self.bcfg, bind=self.endpoint)  # a restart binds the same address
        zoo = Zoo(self.cfg.zoo)
        stages = [f"{m}:0-{len(zoo.manifest(m).chain)}" for m in self.cfg.models]
        self.wcfgs = {
            f"w{i}": worker_config(self.endpoint, Path(self.cfg.zoo), f"w{i}", stages)
            for i in range(self.cfg.workers)
        }
        for name, wcfg in self.wcfgs.items():
            self.launcher.start_worker(name, wcfg)
        self.launcher.wait_ready(list(self.cfg.models), 120.0)
        self.start_planner()

    def start_planner(self) -> None:
        from blockllm.broker.planner.config import PlannerConfig

        pcfg = PlannerConfig(broker=self.endpoint, max_spawn=1, log_level="ERROR")
        self.launcher.start_planner(pcfg)

    def rss(self) -> dict[str, tuple[int, int]]:
        """(pid, RSS bytes) of every live long-lived process by name."""
        import psutil

        procs = {"broker": self.launcher.broker, **self.launcher.workers}
        live = [p for p in self.launcher._planners if p.exitcode is None]
        if live:
            procs["planner"] = live[-1]
        out = {}
        for name, p in procs.items():
            if p is not None and p.pid and p.exitcode is None:
                with contextlib.suppress(psutil.Error):
                    out[name] = (p.pid, psutil.Process(p.pid).memory_info().rss)
        return out

    # -- load ----------------------------------------------------------------------------------
    def stream(self, k: int, want: dict[tuple[str, int], list[int]]) -> None:
        from blockllm.client import Client
        from blockllm.client.errors import BlockLLMError, Timeout

        timeout = self.cfg.request_timeout_s
        with Client(self.endpoint, timeout=timeout, connect_timeout=timeout) as client:
            i = k
            while not self.stop.is_set():
                model = self.cfg.models[i % len(self.cfg.models)]
                p = (i // len(self.cfg.models)) % len(PROMPTS)
                i += 1
                t0 = time.monotonic()
                try:
                    got = client.generate(
                        model, input_ids=PROMPTS[p], max_new_tokens=self.cfg.max_new_tokens
                    ).token_ids
                except Timeout:
                    with self.tally.lock:
                        self.tally.lost += 1
                    continue
                except BlockLLMError as e:
                    with self.tally.lock:
                        self.tally.failed[getattr(e, "code", None) or type(e).__name__] += 1
                    continue
                with self.tally.lock:
                    self.tally.completed += 1
                    self.tally.wrong += got != want[(model, p)]
                    self.tally.done_at.append((t0, time.monotonic()))

    # -- chaos ---------------------------------------------------------------------------------
    def schedule(self, duration: float) -> list[tuple[float, str]]:
        rng = random.Random(self.cfg.seed)
        kinds = [k for k in self.cfg.faults for _ in range(self.cfg.faults_per_kind)]
        rng.shuffle(kinds)
        lo, hi = duration * 0.1, duration * (5 / 6)
        slot = (hi - lo) / max(1, len(kinds))
        return [(lo + slot * (j + rng.uniform(0.1, 0.6)), k) for j, k in enumerate(kinds)]

    def inject(self, kind: str, rng: random.Random) -> None:
        launcher = self.launcher
        if kind in ("kill_worker", "stop_worker"):
            name = rng.choice(sorted(self.wcfgs))
            proc = launcher.workers[name]
            if kind == "kill_worker":
                launcher.kill_worker(name, signal.SIGKILL)
                launcher.wait_exit(proc, 30)
                launcher.start_worker(name, self.wcfgs[name])  # as systemd's Restart= would
            else:
                os.kill(proc.pid, signal.SIGSTOP)
                self.stop.wait(rng.uniform(1.0, 3.0))  # the fault's length, not a sync
                os.kill(proc.pid, signal.SIGCONT)
        elif kind == "restart_planner":
            launcher.kill_planner(signal.SIGKILL)
            for p in launcher._planners:
                launcher.wait_exit(p, 30)
            self.start_planner()
        else:
            old = launcher.broker
            launcher._expected.add(id(old))
            os.kill(old.pid, signal.SIGKILL)
            launcher.wait_exit(old, 30)
            launcher.start_broker(self.bcfg, 60.0)

    def chaos(self, t0: float, duration: float, rss_at: float) -> dict[str, tuple[int, int]]:
        """Inject the scheduled faults; the RSS sample taken `rss_at` s into the run.

        Runs on the main thread, as the Launcher requires: a child arms PR_SET_PDEATHSIG, which
        fires when the *thread* that started it ends, so a broker, planner or worker restarted
        from a helper thread would be SIGTERMed as soon as that thread returned (the broker
        restarted by the last fault went with it, and the requests it had were lost)."""
        rng = random.Random(self.cfg.seed + 1)
        plan = self.schedule(duration) if self.cfg.chaos else []
        plan = sorted([*plan, (rss_at, "rss")], key=lambda e: e[0])
        rss: dict[str, tuple[int, int]] = {}
        for at, kind in plan:
            if self.stop.wait(max(0.0, t0 + at - time.monotonic())):
                break
            if kind == "rss":
                rss = self.rss()
                continue
            started = time.monotonic()
            self.progress(f"fault at {started - t0:.0f} s: {kind}")
            self.inject(kind, rng)
            self.faults.append(
                {
                    "kind": kind,
                    "at_s": round(started - t0, 1),
                    "t": started,
                    "over": time.monotonic(),
                }
            )
        return rss

    def await_recovery(self, limit: float) -> None:
        """Past the run's end, give a fault not yet recovered from up to `limit` s (the load
        goes on meanwhile); a bench's bounded wait on its own tally, not a synchronisation."""
        end = time.monotonic() + limit
        while any(self.recovery(f) is None for f in self.faults) and time.monotonic() < end:
            self.stop.wait(0.2)

    def recovery(self, fault: dict[str, Any]) -> float | None:
        """From the fault until a request started after it was over completed (None: none)."""
        after = [done for start, done in self.tally.done_at if start >= fault["over"]]
        return None if not after else round(min(after) - fault["t"], 2)

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.progress("references (HF generate over the zoo's export)")
        want = references(cfg.zoo, cfg.models, cfg.max_new_tokens)
        self.progress(f"starting broker, planner, {cfg.workers} workers")
        try:
            self.start()
            duration = cfg.minutes * 60
            t0 = time.monotonic()
            threads = [
                threading.Thread(target=self.stream, args=(k, want), daemon=True)
                for k in range(cfg.streams)
            ]
            for t in threads:
                t.start()
            rss_start = self.chaos(t0, duration, min(60.0, duration / 4))
            self.stop.wait(max(0.0, t0 + duration - time.monotonic()))
            self.await_recovery(cfg.request_timeout_s)
            rss_end = self.rss()
            self.stop.set()
            for t in threads:
                t.join(cfg.request_timeout_s + 30)
        finally:
            self.stop.set()
            self.launcher.stop()
        return self.report(rss_start, rss_end, time.monotonic() - t0)

    def report(self, rss_start: dict, rss_end: dict, took: float) -> dict[str, Any]:
        faults = [
            {"kind": f["kind"], "at_s": f["at_s"], "recovery_s": self.recovery(f)}
            for f in self.faults
        ]
        times = [f["recovery_s"] for f in faults if f["recovery_s"] is not None]
        rss = {}
        for name, (pid, start) in rss_start.items():
            if name in rss_end and rss_end[name][0] == pid:  # the same process at both ends
                end = rss_end[name][1]
                rss[name] = {"start": start, "end": end, "growth": round(end / start - 1, 4)}
        t = self.tally
        return {
            "minutes": self.cfg.minutes,
            "took_s": round(took, 1),
            "chaos": self.cfg.chaos,
            "seed": self.cfg.seed,
            "streams": self.cfg.streams,
            "models": list(self.cfg.models),
            "completed": t.completed,
            "failed": dict(t.failed),
            "lost": t.lost,
            "wrong": t.wrong,
            "faults": faults,
            "recovery_s": {
                "p50": statistics.median(times) if times else None,
                "max": max(times) if times else None,
                "unrecovered": sum(1 for f in faults if f["recovery_s"] is None),
            },
            "rss": rss,
            "loadavg": list(os.getloadavg()),
        }


def run_soak(cfg: SoakConfig, progress: Progress = lambda s: None) -> dict[str, Any]:
    return Soak(cfg, progress).run()
