"""Configuration of one worker process (`WorkerProc` / `run_worker_process`).

The engine (`worker.worker.WorkerConfig`) configures the compute; this adds what the process
needs around it: where the broker is, which stages to load at start, liveness timing, and the
test-only fault hook. The CLI builds one of these from flags; nothing below reads the
environment.
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass

from blockllm.worker.errors import InjectedFault

logger = logging.getLogger(__name__)

MiB = 1 << 20


class FaultMode(str, enum.Enum):
    """What the test-only fault hook does once `fault_after_steps` steps have run."""

    EXIT = "exit"  # os._exit(FAULT_EXIT_CODE): a crash, no DEAD, no cleanup (like SIGKILL)
    RAISE = "raise"  # raise InjectedFault in the compute loop: the fatal path (DEAD, exit 1)


# Exit codes of a worker process (documented in `blockllm worker --help`).
EXIT_OK = 0
EXIT_FATAL = 1
EXIT_FAULT = 3


@dataclass(frozen=True, slots=True)
class StageSpec:
    """A stage to load at start: chain positions [start, end) of `model`."""

    model: str
    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> StageSpec:
        """`model:start-end` (chain positions, end exclusive) -> StageSpec; ValueError if bad."""
        model, sep, span = text.rpartition(":")
        lo, dash, hi = span.partition("-")
        if not sep or not model or not dash or not lo.isdigit() or not hi.isdigit():
            raise ValueError(f"bad stage {text!r}: expected MODEL:START-END, e.g. base:0-3")
        start, end = int(lo), int(hi)
        if end <= start:
            raise ValueError(f"bad stage {text!r}: END must be greater than START")
        return cls(model, start, end)

    def __str__(self) -> str:
        return f"{self.model}:{self.start}-{self.end}"


@dataclass(frozen=True, slots=True)
class WorkerProcConfig:
    """Everything one worker process needs; frozen, passed down explicitly (and pickled by
    multiprocessing's spawn to reach the child)."""

    broker: str  # the broker's ROUTER endpoint, e.g. tcp://127.0.0.1:5555
    zoo_dir: str
    stages: tuple[StageSpec, ...] = ()
    device: str = "cpu"
    kv_budget_bytes: int = 256 * MiB
    max_batch_size: int = 32
    max_batch_tokens: int = 4096
    threads: int | None = None  # torch.set_num_threads; None leaves torch's default
    name: str = ""  # also the DEALER identity; "" -> "<host>-<pid>"
    heartbeat_interval_s: float = 1.0
    liveness: int = 3  # broker silent for interval * liveness -> reconnect
    reconnect_max_s: float = 16.0  # cap of the exponential reconnect backoff
    grace_s: float = 10.0  # on SIGTERM/SIGINT: finish in-flight work for at most this long
    input_queue_size: int = 1024  # FORWARDs beyond this are refused with QUEUE_FULL
    dead_linger_ms: int = 2000  # how long close() may take to get DEAD / last results out
    # While fewer than half of its requests are queued, a step waits for more, at most this
    # fraction of the last step's time (0: never; see WorkerProc._gather).
    gather_fraction: float = 0.5
    keys_dir: str | None = None  # CurveZMQ keys (blockllm keys gen); None -> plain TCP
    # Test-only fault injection (STYLE 7.9): after this many engine steps that did work.
    fault_after_steps: int | None = None
    fault_mode: FaultMode = FaultMode.RAISE
    dtype: str | None = None  # serve blocks in this dtype (cast at load); None: as stored
    # Test-only: every engine step that did work takes this much longer (a straggler).
    fault_step_delay_s: float = 0.0
    # Test-only: before reading the weights of a stage commanded by LOAD_STAGE, the loader
    # thread opens this FIFO for reading and reads one byte: a test opening it for writing
    # learns the load is under way and releases it by writing (events, no sleeps)
    fault_load_gate: str | None = None
    log_level: str = "WARNING"
    # weights + KV this worker may hold, advertised to the planner (0: the planner's default)
    memory_budget_bytes: int = 0
    # a stage's model missing from the local zoo (or some of its blocks) is pulled from the
    # broker's zoo before loading, over the worker's own connection (worker/fetch.py)
    fetch_from_broker: bool = True
    fetch_timeout_s: float = 30.0  # per chunk: a broker silent this long fails the load
    load_queue_size: int = 64  # stage loads waiting for the loader thread (more are refused)
    # a load without progress (a fetched chunk, a job's start or end) this long stops the
    # systemd watchdog kicks: a hung loader gets the process restarted (worker/loader.py)
    loader_stall_s: float = 120.0
    # Prometheus endpoint (broker/prom.py; needs prometheus_client): None = off, 0 = OS pick
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # the `stages` are the operator's (`blockllm worker --stage`): READY marks them pinned, and
    # the planner keeps them; serve's and test clusters' stages are a start it may change
    pin_stages: bool = False


def maybe_fault(cfg: WorkerProcConfig, steps: int, name: str) -> None:
    """Test-only fault injection (STYLE 7.9): crash (exit 3) or raise InjectedFault once
    `cfg.fault_after_steps` working steps have run; nothing otherwise."""
    if cfg.fault_after_steps is None or steps < cfg.fault_after_steps:
        return
    if cfg.fault_mode is FaultMode.EXIT:
        logger.error("[dead] worker %s: injected crash after %d steps", name, steps)
        os._exit(EXIT_FAULT)
    raise InjectedFault(f"injected fault after {steps} steps")
