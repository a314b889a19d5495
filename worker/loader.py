"""The worker's loader thread: fetching and reading a stage's weights off the compute thread.

    compute loop ──LoadJob (bounded queue)──► StageLoader: fetch what the zoo lacks (through
                                              the IO thread's socket), read + verify blocks
    compute loop ◄──Loaded (inbox)──────────  (tensors in memory, nothing installed)

Loading a stage is slow (a fetch over the network, reading and hashing every block); the
engine only has to build its modules from tensors already in memory. So the loader does the
slow part and hands the tensors to the compute loop through its inbox as a `Loaded` item; the
compute loop installs them (`Worker.load_stage(..., preread=...)`) between two steps, and
requests on stages already loaded keep stepping meanwhile. Jobs run one at a time, in order.

Health: the loader notes when it last made progress (a job started or ended, a fetched chunk
arrived); `stalled_for(now)` is how long a job has gone without any. The compute loop feeds
systemd's watchdog only while that stays under `loader_stall_s` (worker/proc.py), so a hung
loader gets the process restarted instead of leaving every later load queued behind it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from blockllm.broker.protocol import Error, ErrorCode, StageRef

logger = logging.getLogger(__name__)


def build_engine(cfg: Any) -> Any:
    """The engine `Worker` over the zoo at `cfg.zoo_dir` (a WorkerProcConfig; imported here:
    torch-heavy)."""
    from blockllm.worker.worker import Worker, WorkerConfig
    from blockllm.zoo import Zoo

    return Worker(
        Zoo(cfg.zoo_dir),
        WorkerConfig(
            device=cfg.device,
            kv_budget_bytes=cfg.kv_budget_bytes,
            max_batch_size=cfg.max_batch_size,
            max_batch_tokens=cfg.max_batch_tokens,
            threads=cfg.threads,
            dtype=getattr(cfg, "dtype", None),
        ),
    )


def install(engine: Any, job: LoadJob, blocks: dict[str, dict[str, torch.Tensor]]) -> StageRef:
    """Compute thread, between two steps: build the stage from the blocks the loader read and
    apply the job's batch size; the stage as READY lists it. Raises what `load_stage` raises."""
    info = engine.load_stage(job.model, job.start, job.end, preread=blocks)
    if job.max_batch_size > 0:
        engine.set_max_batch_size(info.key, job.max_batch_size)
    return StageRef(info.key, job.model, job.start, job.end, int(info.nbytes), info.dtype)


def load_error(job: LoadJob, e: BaseException) -> Error:
    """The typed ERROR the broker shows as the worker's `last_error` for a failed load."""
    code = getattr(getattr(e, "code", None), "value", ErrorCode.INTERNAL.value)
    return Error("", str(code), f"load {job}: {e}")


class LoaderBusy(RuntimeError):
    """Too many stage loads are waiting already (`load_queue_size`)."""


@dataclass(frozen=True, slots=True)
class LoadJob:
    """Load chain positions [start, end) of `model`; `startup`: one of the configured stages."""

    model: str
    start: int
    end: int
    max_batch_size: int = 0  # > 0: set the stage's max batch size once installed
    startup: bool = False

    def __str__(self) -> str:
        return f"{self.model}:{self.start}-{self.end}"


@dataclass(frozen=True, slots=True)
class AdapterJob:
    """Read LoRA adapter blocks a request names (fetched first where the zoo lacks them and
    the worker pulls from the broker), in `dtype`."""

    blocks: tuple[str, ...]
    dtype: str

    def __str__(self) -> str:
        return f"{len(self.blocks)} adapter blocks ({self.blocks[0][:12]}..)"


@dataclass(frozen=True, slots=True)
class Loaded:
    """Inbox item from the loader: the job's blocks read (`blocks`), or why it failed."""

    job: LoadJob | AdapterJob
    blocks: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class _Stop:
    """Queue marker: end the loader thread."""


def start_loader(cfg: Any, engine: Any, ask: Callable[..., Any], inbox: Any) -> StageLoader:
    """The started loader thread of a worker process (a WorkerProcConfig `cfg`): reads blocks
    with the engine's `read_blocks` and, when the engine has a zoo and `fetch_from_broker`,
    first pulls what it lacks through `ask` (the IO thread's `fetch`); each answer counts as
    the loader's progress."""
    loader = StageLoader(
        engine.read_blocks,
        None,
        inbox,
        max_jobs=max(cfg.load_queue_size, len(cfg.stages)),
        gate=cfg.fault_load_gate,
    )
    zoo = getattr(engine, "zoo", None)
    fetch_adapters = None
    if zoo is not None and cfg.fetch_from_broker:
        from blockllm.worker.fetch import fetch_blocks, fetch_model

        def ask_noting_progress(msg: Any) -> Any:
            answer = ask(msg)
            loader.touch()
            return answer

        loader.fetch = functools.partial(fetch_model, ask_noting_progress, zoo, source=cfg.broker)
        fetch_adapters = functools.partial(
            fetch_blocks, ask_noting_progress, zoo, source=cfg.broker
        )
    if zoo is not None and hasattr(engine, "read_block"):
        loader.read_adapters = functools.partial(read_adapters, engine, fetch_adapters)
    loader.start()
    return loader


def read_adapters(
    engine: Any, fetch: Callable[[tuple[str, ...]], int] | None, job: AdapterJob
) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter blocks of `job` read from the engine's zoo, `fetch`ed first where it lacks
    them; under the zoo's shared lock (no manifest names fetched adapter blocks: gc must wait
    until they are read)."""
    with engine.zoo.shared_lock():
        if fetch is not None:
            fetch(job.blocks)
        return {b: engine.read_block(b, job.dtype) for b in job.blocks}


def unhealthy(io: Any, loader: StageLoader | None, stall_s: float) -> str:
    """Why a worker's threads are not all healthy ("" if they are): its IO thread `io` must
    run, its loader must have made progress within `stall_s` (the watchdog's condition)."""
    if not io.is_alive():
        return "the IO thread is not running"
    stalled = loader.stalled_for() if loader is not None else 0.0
    if stalled > stall_s:
        return f"loader stuck on {loader.loading if loader else None} for {stalled:.0f} s"
    return ""


class StageLoader(threading.Thread):
    """Runs `LoadJob`s in order: `fetch(model)` (None: no fetching), then `read(model, start,
    end)`; puts a `Loaded` into `inbox` for each. `submit` and `stop` may be called from any
    thread; nothing else touches the engine here but its thread-safe `read_blocks`."""

    def __init__(
        self,
        read: Callable[[str, int, int], dict[str, dict[str, torch.Tensor]]],
        fetch: Callable[[str], int] | None,
        inbox: queue.SimpleQueue[Any],
        *,
        max_jobs: int = 64,
        gate: str | None = None,
    ) -> None:
        super().__init__(name="worker-loader", daemon=True)
        self._read = read
        self.fetch = fetch  # set before start()
        # AdapterJob -> its blocks' tensors (loader.read_adapters); None: no adapter jobs
        self.read_adapters: Callable[[AdapterJob], dict[str, dict[str, torch.Tensor]]] | None = None
        self._inbox = inbox
        self._jobs: queue.Queue[LoadJob | AdapterJob | _Stop] = queue.Queue(maxsize=max_jobs)
        self._gate = gate
        self.loading: LoadJob | AdapterJob | None = None  # the job in progress (for logs and facts)
        self._progress_at = time.monotonic()  # last job start/end or fetched chunk
        self._stopping = False

    def submit(self, job: LoadJob | AdapterJob) -> None:
        """Queue a load; raises LoaderBusy when `max_jobs` are waiting already."""
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise LoaderBusy(f"{self._jobs.maxsize} stage loads already waiting") from None

    def stop(self) -> None:
        """End the thread after the job in progress; never blocks (jobs still queued are
        dropped: the process is going away)."""
        self._stopping = True
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(_Stop())

    def touch(self) -> None:
        """Note progress of the job in progress (any thread; one float store)."""
        self._progress_at = time.monotonic()

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds the job in progress has gone without progress; 0 when idle. A loader
        thread that died counts as stalled since it was last seen."""
        now = time.monotonic() if now is None else now
        if self.loading is None and self.is_alive():
            return 0.0
        return max(0.0, now - self._progress_at)

    def run(self) -> None:
        while True:
            job = self._jobs.get()
            if isinstance(job, _Stop) or self._stopping:
                return
            self.touch()
            self.loading = job
            loaded = self._run_job(job)
            self.loading = None
            self.touch()
            self._inbox.put(loaded)

    def _run_job(self, job: LoadJob | AdapterJob) -> Loaded:
        """Fetch and read one stage; every error is the job's, never the thread's."""
        if isinstance(job, AdapterJob):
            try:
                assert self.read_adapters is not None, "adapter jobs need read_adapters"
                return Loaded(job, self.read_adapters(job))
            except Exception as e:
                logger.warning("[load] %s failed: %s: %s", job, type(e).__name__, e)
                return Loaded(job, error=e)
        try:
            if self.fetch is not None:
                self.fetch(job.model)
            if not job.startup:
                self._wait_gate()
            blocks = self._read(job.model, job.start, job.end)
        except Exception as e:
            logger.warning("[load] %s failed: %s: %s", job, type(e).__name__, e)
            return Loaded(job, error=e)
        logger.info("[load] %s read (%d blocks not held yet)", job, len(blocks))
        return Loaded(job, blocks)

    def _wait_gate(self) -> None:
        """Test-only (`fault_load_gate`): a test opening the FIFO for writing learns that this
        load is under way (its open returns once we opened it); we go on once it writes a
        byte or closes it. Events both ways, no sleeps."""
        if self._gate is None:
            return
        logger.info("[load] waiting at the test gate %s", self._gate)
        fd = os.open(self._gate, os.O_RDONLY)  # blocks until the test opens it for writing
        try:
            os.read(fd, 1)  # blocks until the test writes or closes
        finally:
            os.close(fd)
