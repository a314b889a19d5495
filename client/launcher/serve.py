"""`blockllm serve`: a broker, N workers placed by the static placement and the planner on this
machine (and with --http the OpenAI-compatible HTTP API), in the foreground, until
SIGINT/SIGTERM (or a failure it cannot heal) stops them all.

`run_serve(cfg, announce)` plans the workers' stages (`plan_workers`: the static placement,
weighted by compute per token), starts everything through a `Launcher`, calls `announce` once
every model is covered, and stops the children in order at the end.

Healing: every child is restarted in its slot when it dies (SIGKILL by the OOM killer, a crash):
- a worker with the same name and stages; meanwhile the broker keeps its requests waiting and
  replays them on the new worker (or wherever the planner moved the stages);
- the planner with the same flags: its state is soft (it re-reads the cluster from the broker's
  stats and keeps the routes the broker holds); the workers it spawned die with it;
- the HTTP API on the port it had bound; requests it was streaming fail with a dropped
  connection (an HTTP client retries), new ones are served once it answers again;
- the broker on the endpoint it had bound: workers register again (they keep their stages),
  clients resume their requests from the tokens they already have (`Generate.resume_ids`), the
  planner subscribes to the new broker's stats.
So an accepted request is answered unless the HTTP API itself died under it. A slot that dies
`crash_loop_deaths` times within `crash_loop_window_s` is crash-looping: serve stops
everything and exits 1, as it does when a restart fails.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from blockllm.broker.lifecycle import WakePipe
from blockllm.client.launcher.launcher import Death, Launcher, LaunchError

logger = logging.getLogger(__name__)

KV_PAGE_SIZE = 16  # the engine's tokens per KV page (worker.items.WorkerConfig.page_size)


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """One machine's cluster: a broker and `workers` workers over the zoo at `zoo_dir`.

    `broker` (a BrokerConfig) and `worker` (a WorkerProcConfig) are templates: the launcher
    fills in the endpoint, each worker's name, stages and thread count.
    """

    zoo_dir: str
    broker: Any
    worker: Any
    workers: int = 2
    models: tuple[str, ...] = ()  # () = every model in the zoo
    threads: int | None = None  # per worker; None = the usable cores split across workers
    ready_timeout_s: float = 120.0
    log_level: str = "WARNING"
    planner: Any = None  # a PlannerConfig: started once the cluster is ready; None = no planner
    http: Any = None  # an HttpConfig: the OpenAI-compatible API, started last; None = none
    crash_loop_deaths: int = 3  # a worker slot dying this often within the window: give up
    crash_loop_window_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Serving:
    """What `run_serve` announces once everything is ready."""

    endpoint: str
    models: tuple[str, ...]
    workers: tuple[tuple[str, int, tuple[str, ...]], ...]  # (name, pid, stages)
    http: str = ""  # the HTTP API's base URL ("": none)
    configs: dict[str, Any] = field(default_factory=dict)  # slot name -> its child's config


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived while the cluster was still starting."""


class Slots:
    """The slots serve restarts (workers, "planner", "http", "broker"), and the crash-loop rule
    (pure: no processes).

    `death(name, now)` records a death of slot `name`: True if it may be restarted, False if
    the slot died `deaths` times within `window_s` seconds (or is not a slot: unhealable).
    """

    def __init__(self, names: Any, deaths: int, window_s: float) -> None:
        self.deaths = deaths
        self.window_s = window_s
        self.history: dict[str, deque[float]] = {n: deque() for n in names}

    def death(self, name: str, now: float) -> bool:
        times = self.history.get(name)
        if times is None:
            return False
        times.append(now)
        while times and now - times[0] > self.window_s:
            times.popleft()
        return len(times) < self.deaths

    def recent(self, name: str) -> int:
        """Deaths of slot `name` within the window (as of its last death)."""
        return len(self.history.get(name, ()))


def plan_workers(cfg: ServeConfig) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    """(models served, stages of each worker) by static placement over the zoo's manifests."""
    from blockllm.broker.routing import static_placement
    from blockllm.worker.config import StageSpec
    from blockllm.zoo import Zoo

    zoo = Zoo(cfg.zoo_dir)
    known = zoo.list_models()
    models = cfg.models or tuple(known)
    unknown = [m for m in models if m not in known]
    if not models or unknown:
        have = ", ".join(known) or "none"
        what = f"unknown models {', '.join(unknown)}" if unknown else "no models"
        raise LaunchError(
            f"{what} in zoo {cfg.zoo_dir} (it has: {have}); import one with "
            "`blockllm zoo import PATH --name NAME`"
        )
    manifests = {m: zoo.manifest(m) for m in models}
    plan = static_placement([ComputeWeighted(manifests[m]) for m in models], cfg.workers)
    plan = [kv_order(stages, manifests) for stages in plan]
    budget = getattr(cfg.worker, "kv_budget_bytes", None)
    refused = _kv_refusals(plan, manifests, budget) if budget is not None else []
    if refused:  # a worker would refuse its stage: say so now rather than start it
        raise LaunchError(
            f"--kv-budget {budget} is too small for these models on {cfg.workers} workers"
            f" ({refused[0]}); give the workers a larger --kv-budget"
        )
    return tuple(models), [tuple(StageSpec(*s) for s in stages) for stages in plan]


def kv_order(stages: list[tuple[str, int, int]], manifests: dict[str, Any]) -> list[Any]:
    """A worker's stages in the order that gives its KV arena the most pages: the first stage
    with layers sets the page (16 of its tokens), so a geometry with small rows comes first,
    yet one whose page still holds a token of the largest rows (worker/kv_cache.py)."""
    from blockllm.zoo.chain import decoder_layers_in, kv_row_bytes

    def row(stage: tuple[str, int, int]) -> int:
        m = manifests[stage[0]]
        return kv_row_bytes(m) if decoder_layers_in(len(m.chain), stage[1], stage[2]) else 0

    rows = [row(s) for s in stages if row(s)]
    if not rows:
        return list(stages)
    first = min(r for r in rows if r * KV_PAGE_SIZE >= max(rows))
    # stable: stages without layers and those of the first geometry first, in their order
    return sorted(stages, key=lambda s: row(s) not in (0, first))


def _kv_refusals(
    plan: list[list[tuple[str, int, int]]], manifests: dict[str, Any], budget: int
) -> list[str]:
    """Why workers would refuse their stages of `plan` for KV (zoo.chain.kv_refusal)."""
    from blockllm.zoo.chain import decoder_layers_in, kv_refusal, kv_row_bytes

    out = []
    for i, stages in enumerate(plan):
        rows = []
        for model, start, end in stages:
            m = manifests[model]
            rows.append((kv_row_bytes(m), decoder_layers_in(len(m.chain), start, end)))
        why = kv_refusal(rows, budget, KV_PAGE_SIZE)
        if why:
            out.append(f"worker-{i}: {why}")
    return out


class ComputeWeighted:
    """A manifest whose `block_bytes` estimate each position's compute per token, so that
    `static_placement` (which balances `block_bytes`) balances the pipeline's step times.

    Stored bytes mislead at both ends of a chain: the embedding is a lookup (a big block,
    almost no compute), while the head's lm_head matmul costs vocab x hidden multiply-adds
    per token even when it is tied (a tiny stored block). Decoder layers cost their weights.
    """

    def __init__(self, manifest: Any) -> None:
        self._m = manifest
        self.name = manifest.name
        self.chain = manifest.chain
        self.fingerprint = manifest.fingerprint

    @property
    def block_bytes(self) -> tuple[int, ...]:
        stored = tuple(self._m.block_bytes)
        if len(stored) != len(self.chain):
            return stored  # sizes unknown: placement balances by block count
        cfg = self._m.config
        itemsize = 2 if self._m.dtype in ("bfloat16", "float16") else 4
        lm_head = int(cfg.get("vocab_size", 0)) * int(cfg.get("hidden_size", 0)) * itemsize
        embed = max(1, int(cfg.get("hidden_size", 0)) * itemsize)  # one row read per token
        return (embed, *stored[1:-1], stored[-1] + (lm_head if self._m.tie_word_embeddings else 0))


def default_threads(workers: int) -> int:
    """torch threads per worker: the usable cores split evenly (at least one each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, workers))


def spare_worker_args(wcfg: Any, threads: int) -> tuple[str, ...]:
    """The `blockllm worker` flags of a worker the planner spawns (broker/planner/spawn.py):
    those of serve's own workers (the planner adds --broker, --zoo, --keys and --name)."""
    args = ["--device", wcfg.device, "--kv-budget", str(wcfg.kv_budget_bytes)]
    if getattr(wcfg, "dtype", None):
        args += ["--dtype", wcfg.dtype]
    args += ["--max-batch-size", str(wcfg.max_batch_size), "--threads", str(threads)]
    args += ["--max-batch-tokens", str(wcfg.max_batch_tokens)]
    args += ["--heartbeat-interval", str(wcfg.heartbeat_interval_s), "--grace", str(wcfg.grace_s)]
    if wcfg.memory_budget_bytes:
        args += ["--memory-budget", str(wcfg.memory_budget_bytes)]
    return tuple(args)


def run_serve(cfg: ServeConfig, announce: Callable[[Serving], None]) -> int:
    """Start the cluster, call `announce` once it is ready, run until SIGINT/SIGTERM (-> 0)
    or a death it cannot heal (-> 1; a dead worker is restarted, see the module doc). Raises
    LaunchError if it cannot start; returns 130 when interrupted while starting. Main thread
    only (signal handlers)."""
    models, plan = plan_workers(cfg)
    wake = WakePipe()
    state = {"serving": False, "stop": False}

    def on_signal(signum: int, _frame: Any) -> None:
        state["stop"] = True
        wake.wake(b"s")
        if not state["serving"]:
            raise Interrupted(signal.Signals(signum).name)

    def on_death(_death: Death) -> None:
        wake.wake(b"d")

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, on_signal) for sig in sigs}
    launcher = Launcher(log_level=cfg.log_level, on_death=on_death)
    try:
        serving = _start_cluster(launcher, cfg, models, plan)
        state["serving"] = True
        if state["stop"]:
            return 0
        announce(serving)
        slots = Slots(serving.configs, cfg.crash_loop_deaths, cfg.crash_loop_window_s)
        seen = 0
        while not state["stop"]:
            multiprocessing.connection.wait([wake.fd])
            wake.drain()
            while seen < len(launcher.deaths) and not state["stop"]:
                death = launcher.deaths[seen]
                seen += 1
                if not _heal(launcher, slots, serving, death, cfg.ready_timeout_s):
                    return 1
        logger.info("[shutdown] signal received; stopping")
        return 0
    except Interrupted as e:
        logger.warning("[shutdown] %s while starting; stopping", e)
        return 130
    finally:
        state["serving"] = True  # no Interrupted from here on: the teardown must finish
        launcher.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        wake.close()


def _heal(launcher: Launcher, slots: Slots, serving: Serving, death: Death, timeout: float) -> bool:
    """Restart the slot of `death` (waiting up to `timeout` s for a broker or HTTP API to be
    ready); False (logged) when it cannot be healed."""
    if not slots.death(death.name, time.monotonic()):
        if death.name in slots.history:
            why = (
                f"{_slot(death.name)} is crash-looping: {slots.recent(death.name)} deaths "
                f"within {slots.window_s:g} s (--crash-loop-deaths/--crash-loop-window)"
            )
        else:
            why = f"{death}: serve cannot run without it"
        logger.error("[shutdown] stopping: %s", why)
        return False
    cfg = serving.configs[death.name]
    try:
        if death.name == "broker":
            launcher.start_broker(cfg, timeout)
            proc = launcher.broker
            how = f"on {launcher.endpoint}; workers register again and clients resume"
        elif death.name == "planner":
            proc = launcher.start_planner(cfg)
            how = "with the same flags; it reads the cluster from the broker's stats"
        elif death.name == "http":
            launcher.start_http(cfg, timeout)
            proc = launcher.http
            how = f"at {launcher.http_url}"
        else:
            proc = launcher.start_worker(death.name, cfg)
            how = "with the same stages; the broker replays its requests"
    except LaunchError as e:
        logger.error("[shutdown] stopping: %s; restarting it failed: %s", death, e)
        return False
    logger.warning(
        "[restart] %s; restarted it as pid %s %s (death %d of %d allowed within %g s)",
        death,
        proc.pid if proc is not None else "?",
        how,
        slots.recent(death.name),
        slots.deaths - 1,
        slots.window_s,
    )
    return True


def _slot(name: str) -> str:
    return name if name in ("broker", "planner", "http") else f"worker slot {name}"


def _start_cluster(
    launcher: Launcher, cfg: ServeConfig, models: tuple[str, ...], plan: list[tuple[Any, ...]]
) -> Serving:
    endpoint = launcher.start_broker(cfg.broker, cfg.ready_timeout_s)
    configs: dict[str, Any] = {"broker": replace(cfg.broker, bind=endpoint)}  # the same port
    threads = cfg.threads or default_threads(sum(1 for p in plan if p))
    describe: dict[str, str] = {}
    for i, stages in enumerate(plan):
        if not stages:
            continue  # more workers than chain positions
        name = f"worker-{i}"
        wcfg = replace(cfg.worker, broker=endpoint, name=name, stages=stages, threads=threads)
        launcher.start_worker(name, wcfg)
        configs[name] = wcfg
        describe[name] = "stages " + ", ".join(map(str, stages))
    launcher.wait_ready(list(models), cfg.ready_timeout_s, describe, cfg.worker.keys_dir)
    if cfg.planner is not None:  # it refines the static placement from the live stats
        spare = spare_worker_args(cfg.worker, threads)
        pcfg = replace(cfg.planner, broker=endpoint, zoo_dir=cfg.zoo_dir, spawn_worker_args=spare)
        launcher.start_planner(pcfg)
        configs["planner"] = pcfg
    workers = tuple(
        (name, p.pid or 0, tuple(describe[name].removeprefix("stages ").split(", ")))
        for name, p in launcher.workers.items()
    )
    http = ""
    if cfg.http is not None:  # last: its ready line means every model answers over HTTP
        http = launcher.start_http(replace(cfg.http, broker=endpoint), cfg.ready_timeout_s)
        configs["http"] = replace(cfg.http, broker=endpoint, port=launcher.http_port)  # its port
    return Serving(endpoint, models, workers, http, configs)
