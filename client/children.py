"""Child processes of the `Launcher`: what a spawned child runs first, and how children are
stopped (STYLE 7.8, steps 2 and 6). Split out of launcher.py, which re-exports these names.

- `_child_main` is every child's entry point: arm PR_SET_PDEATHSIG (SIGTERM when the launcher
  dies) and re-check the parent, own process group, process name, logging, then
  `run_<name>_process(cfg)`;
- `shutdown(procs, timeout)` (module-level, for `weakref.finalize`): terminate -> join until the
  deadline -> kill the process tree with psutil.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Any

import psutil

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


# -- the child side ---------------------------------------------------------------------------


def arm_parent_death(expected_ppid: int) -> None:
    """Ask the kernel for SIGTERM when our parent dies (Linux), then close the race: if the
    parent died before we armed, exit now. Call first thing in a spawned child."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != expected_ppid:
        os._exit(1)


def set_process_name(name: str) -> None:
    """The name `ps -o comm` and `top` show (Linux; at most 15 bytes)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def _child_main(target: str, cfg: Any, parent_pid: int, name: str, log_level: str) -> None:
    """Entry point of every spawned child: arm, name, log, then run `target(cfg)`."""
    arm_parent_death(parent_pid)
    os.setpgid(0, 0)  # own process group: terminal signals go to the launcher only
    set_process_name(f"blockllm-{name}")
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    module, _, func = target.partition(":")
    run = getattr(importlib.import_module(module), func)
    sys.exit(int(run(cfg) or 0))


# -- cleanup ----------------------------------------------------------------------------------


def shutdown(procs: Sequence[BaseProcess], timeout: float) -> None:
    """Stop `procs`: SIGTERM all, join until `timeout`, then SIGKILL each survivor's tree.

    Module-level (weakref.finalize must not hold the launcher alive); safe to call twice.
    """
    alive = [p for p in procs if p.pid is not None and p.exitcode is None]
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in alive:
        if p.exitcode is None:
            logger.warning("[shutdown] %s (pid %s) ignored SIGTERM; killing it", p.name, p.pid)
            kill_tree(p.pid)
            p.join(5)


def kill_tree(pid: int | None) -> None:
    """SIGKILL a process and every descendant (children first found, then the root)."""
    if pid is None:
        return
    try:
        root = psutil.Process(pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(family, timeout=5)


def _shutdown_groups(
    groups: Sequence[Sequence[BaseProcess]], timeout: float, stopping: threading.Event
) -> None:
    stopping.set()  # the monitor reports no deaths from here on
    for group in groups:
        shutdown(group, timeout)
