"""The stages a worker process announces (READY) and the broker's commands that change them:
LOAD_STAGE (queued on the loader thread), UNLOAD_STAGE, SET_BATCH; what the loader read is
installed here, between two steps. Owned by `WorkerProc` (worker/proc.py); compute thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from blockllm.broker.lifecycle import notify
from blockllm.broker.protocol import Error, ErrorCode, LoadStage, SetBatch, StageRef, UnloadStage
from blockllm.worker.config import WorkerProcConfig
from blockllm.worker.errors import StartupLoadFailed, WorkerError
from blockllm.worker.facts import ready_message
from blockllm.worker.fetch import CorruptBlock
from blockllm.worker.loader import Loaded, LoaderBusy, LoadJob, StageLoader, install, load_error

logger = logging.getLogger(__name__)


class StageTable:
    """This worker's stages as the broker sees them, and READY. `engine` and `loader` are set
    by `WorkerProc.start()`; `refresh(force)` publishes the load facts."""

    def __init__(
        self, name: str, cfg: WorkerProcConfig, io: Any, refresh: Callable[[bool], None]
    ) -> None:
        self.name, self.cfg, self.io = name, cfg, io
        self._refresh = refresh
        self.engine: Any = None
        self.loader: StageLoader | None = None
        self.refs: dict[str, StageRef] = {}  # stage key -> what READY lists
        self.refused: set[str] = set()  # blocks fetched corrupt: READY refused_blocks
        self.startup_left = len(cfg.stages)  # configured stages not installed yet
        self.announced = False  # the first READY went out

    def handle_load_stage(self, msg: LoadStage, _tensors: list[torch.Tensor]) -> None:
        """Queue the load on the loader thread; READY (or ERROR) follows when it is done."""
        assert self.loader is not None, "start() first"
        job = LoadJob(msg.model, msg.start, msg.end, msg.max_batch_size)
        try:
            self.loader.submit(job)
        except LoaderBusy as e:
            self._load_failed(job, e)
            self.send_ready()

    def handle_unload_stage(self, msg: UnloadStage, _tensors: list[torch.Tensor]) -> None:
        if msg.key in self.refs:
            self.engine.unload_stage(msg.key)
            del self.refs[msg.key]
        else:
            self.io.send(Error("", ErrorCode.UNKNOWN_STAGE.value, f"no stage {msg.key}"))
        self.send_ready()

    def handle_set_batch(self, msg: SetBatch, _tensors: list[torch.Tensor]) -> None:
        try:
            self.engine.set_max_batch_size(msg.key, msg.max_batch_size)
        except WorkerError as e:
            self.io.send(Error("", e.code.value, f"set batch of {msg.key[:12]}: {e.message}"))
            return
        logger.info("worker %s: stage %s max batch %d", self.name, msg.key[:12], msg.max_batch_size)
        self._refresh(True)

    def on_loaded(self, item: Loaded) -> None:
        """The loader read a stage: install it, then announce it. Raises StartupLoadFailed
        for a configured stage that cannot load."""
        job, error = item.job, item.error
        if error is None:
            try:
                self._install(job, item.blocks)
            except Exception as e:
                error = e
        if error is not None and job.startup:
            raise StartupLoadFailed(f"cannot load configured stage {job}: {error}") from error
        if error is not None:
            self._load_failed(job, error)
        if job.startup:
            self.startup_left -= 1
            if self.startup_left == 0:
                self.announce()
        elif self.announced:
            self.send_ready()

    def _install(self, job: LoadJob, blocks: dict[str, dict[str, torch.Tensor]]) -> str:
        ref = install(self.engine, job, blocks)
        self.refs.setdefault(ref.key, ref)  # a stage shared with a loaded one keeps its name
        logger.info("worker %s loaded %s (%d bytes)", self.name, job, ref.nbytes)
        self._refresh(True)
        return ref.key

    def _load_failed(self, job: LoadJob, e: BaseException) -> None:
        """The typed ERROR the broker shows as the worker's `last_error`; READY follows."""
        logger.error("worker %s: cannot load %s: %s: %s", self.name, job, type(e).__name__, e)
        if isinstance(e, CorruptBlock):  # READY names it: the planner places it elsewhere
            self.refused.add(e.block)
        self.io.send(load_error(job, e))

    def announce(self) -> None:
        """The first READY: every configured stage is installed; tell systemd too."""
        self.announced = True
        self._refresh(True)
        self.send_ready()
        stages = ", ".join(str(s) for s in self.cfg.stages) or "no stages"
        notify("READY=1", f"STATUS=serving {stages} via {self.cfg.broker}")
        logger.info("[ready] worker %s pid %d serving %s", self.name, os.getpid(), stages)

    def send_ready(self) -> None:
        stages, refused = tuple(self.refs.values()), tuple(sorted(self.refused))
        self.io.send(ready_message(self.name, self.cfg, stages, self.engine, refused))
