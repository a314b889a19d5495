"""Process lifecycle, written once for every `blockllm` process (STYLE 7.8): parent death,
stop signals, the drain, systemd notifications and the escalation that stops children.

The child side (broker, planner, worker, a spawned worker):
- `arm_parent_death(ppid)`: the kernel sends SIGTERM when the parent dies (PR_SET_PDEATHSIG on
  Linux); a parent that died before it was armed is caught by re-checking `os.getppid()`
  against the pid read before the child started;
- `on_stop_signals(callback)`: SIGTERM/SIGINT only call back (set a flag, wake the loop); the
  loop drains (`begin_drain`: STOPPING=1 to systemd, a deadline) and exits;
- `set_process_name(name)` for `ps` and `top`.

The parent side (the launcher, the planner's spawner): `stop_processes(procs, timeout)`
terminates, waits until the deadline, then SIGKILLs each survivor's process tree
(`kill_tree`); it takes `multiprocessing` processes and `subprocess.Popen`s alike, and each is
reaped by its own handle, so its exit code stays known.

systemd's readiness protocol (`Type=notify`), hand-written: `notify(*states)` sends one
datagram of newline-separated `KEY=VALUE` states to the AF_UNIX socket named by
`NOTIFY_SOCKET` (a leading `@` names an abstract socket). Outside systemd the variable is unset
and `notify` does nothing, so every process may call it freely:

    notify("READY=1", "STATUS=serving 3 stages")   # after the process can serve
    notify("STOPPING=1")                            # when a drain begins

With `WatchdogSec=` in the unit, systemd also sets WATCHDOG_USEC and restarts a process that
stops sending `WATCHDOG=1` for that long (a hung event loop, not only a dead process):
`Watchdog.kick()` from every turn of a loop sends it at half the interval. These variables
are read here and not in the CLI because systemd sets them for the process itself, not for
configuration. See sd_notify(3).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from typing import Any

import psutil

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
Child = BaseProcess | subprocess.Popen


# -- the child side -----------------------------------------------------------------------------


def arm_parent_death(expected_ppid: int) -> None:
    """Ask the kernel for SIGTERM when our parent dies (Linux), then close the race: if the
    parent died before we armed, exit now (code 1). Call first thing in a child (also from a
    Popen's preexec_fn: it only calls prctl and getppid)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != expected_ppid:
        os._exit(1)


def start_process(parent_pid: int | None, log_level: str) -> None:
    """First lines of a process entry point: arm parent death when a parent started it, and
    log to stderr at `log_level` unless logging is set up already (a launcher's child is)."""
    if parent_pid is not None:
        arm_parent_death(parent_pid)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=log_level,
            format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        )


def freeze_heap() -> None:
    """Move every object alive now into the collector's permanent generation (`gc.freeze`).

    Call once a process has imported and built what it keeps for its lifetime. torch and
    transformers leave about a million tracked objects; without this every full collection
    walks them again (a pause in the serving loop), and so does the collection at interpreter
    exit: 1.2-1.5 CPU-s per worker or broker after its last log line, measured. Frozen objects
    are still freed by reference counting; only cycles among them are never collected, so call
    this before loading anything the process may later drop (blocks, adapters)."""
    gc.freeze()


def set_process_name(name: str) -> None:
    """The name `ps -o comm` and `top` show (Linux; at most 15 bytes)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def on_stop_signals(callback: Callable[[int], None]) -> dict[int, Any]:
    """SIGTERM/SIGINT -> `callback(signum)`; the previous handlers (for `restore_signals`).

    Main thread only: elsewhere nothing is installed ({}), the caller stops the loop itself."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, _frame: Any) -> None:
        callback(signum)

    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class WakePipe:
    """A self-pipe that wakes a poll loop: `wake()` from any thread or a signal handler
    (async-signal-safe: one non-blocking write; a full pipe already holds a wake-up), `fd` for
    the poller, `drain()` once it is readable, `close()` at the end."""

    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)

    def wake(self, what: bytes = b"\0") -> None:
        with contextlib.suppress(OSError):
            os.write(self._write_fd, what)

    def drain(self) -> bytes:
        with contextlib.suppress(OSError):
            return os.read(self.fd, 4096)
        return b""

    def close(self) -> None:
        for fd in (self.fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def begin_drain(running: int, timeout_s: float) -> float:
    """A stop was asked for: tell systemd STOPPING=1 (the caller logs its `[shutdown]` line);
    the drain's monotonic deadline."""
    notify("STOPPING=1", f"STATUS=draining {running} requests")
    return time.monotonic() + timeout_s


# -- systemd --------------------------------------------------------------------------------------


def notify(*states: str) -> bool:
    """Send `states` to systemd's notify socket; True if sent, False outside systemd or on error."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or not states:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall("\n".join(states).encode())
        return True
    except OSError as e:
        logger.warning("sd_notify %s to %s failed: %s", states, path, e)
        return False


class Watchdog:
    """`WATCHDOG=1` at half of systemd's WatchdogSec, for a loop that calls `kick()` often.

    Off (kick is a no-op) without WATCHDOG_USEC, or when WATCHDOG_PID names another process
    (the variables were inherited by a child)."""

    def __init__(self) -> None:
        self.interval_s = 0.0
        self._next = 0.0
        usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.interval_s = int(usec) / 2e6

    def kick(self) -> None:
        if self.interval_s <= 0:
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval_s
            notify("WATCHDOG=1")


# -- the parent side: stopping children -----------------------------------------------------------


def _alive(p: Child) -> bool:
    if isinstance(p, subprocess.Popen):
        return p.poll() is None
    return p.pid is not None and p.exitcode is None


def _reap(p: Child, timeout: float) -> None:
    """Wait up to `timeout` s for `p` to exit, reaping it through its own handle."""
    if isinstance(p, subprocess.Popen):
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout)
    else:
        p.join(timeout)


def kill_tree(p: Child) -> None:
    """SIGKILL a child and every descendant; the child is reaped by its handle (exit code
    kept), the descendants are waited for."""
    try:
        family = psutil.Process(p.pid).children(recursive=True)
    except (psutil.NoSuchProcess, ValueError):
        family = []
    for q in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            q.kill()
    with contextlib.suppress(ProcessLookupError):
        p.kill()
    _reap(p, 5.0)
    psutil.wait_procs(family, timeout=5)


def stop_processes(procs: Sequence[Child], timeout: float) -> None:
    """Stop `procs`: SIGTERM all, wait until `timeout`, then SIGKILL each survivor's tree.

    Module-level (weakref.finalize must not hold its owner alive); safe to call twice."""
    alive = [p for p in procs if _alive(p)]
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in alive:
        _reap(p, max(0.0, deadline - time.monotonic()))
    for p in alive:
        if _alive(p):
            name = getattr(p, "name", "child")
            logger.warning("[shutdown] %s (pid %s) ignored SIGTERM; killing it", name, p.pid)
            kill_tree(p)
