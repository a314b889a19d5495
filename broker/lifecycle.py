"""systemd's readiness protocol (`Type=notify`), hand-written: one datagram to $NOTIFY_SOCKET.

The protocol is a newline-separated list of `KEY=VALUE` states sent as one datagram to the
AF_UNIX socket named by `NOTIFY_SOCKET` (a leading `@` names an abstract socket). Outside
systemd the variable is unset and `notify` does nothing, so every process may call it freely:

    notify("READY=1", "STATUS=serving 3 stages")   # after the process can serve
    notify("STOPPING=1")                            # when a drain begins

With `WatchdogSec=` in the unit, systemd also sets WATCHDOG_USEC and restarts a process that
stops sending `WATCHDOG=1` for that long (a hung event loop, not only a dead process):
`Watchdog.kick()` from every turn of a loop sends it at half the interval.

The variable is read here and not in `cli.py` because systemd sets it for the process itself,
not for configuration. See sd_notify(3).
"""

from __future__ import annotations

import logging
import os
import socket
import time

logger = logging.getLogger(__name__)


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
