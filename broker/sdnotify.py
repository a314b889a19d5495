"""systemd's readiness protocol (`Type=notify`), hand-written: one datagram to $NOTIFY_SOCKET.

The protocol is a newline-separated list of `KEY=VALUE` states sent as one datagram to the
AF_UNIX socket named by `NOTIFY_SOCKET` (a leading `@` names an abstract socket). Outside
systemd the variable is unset and `notify` does nothing, so every process may call it freely:

    notify("READY=1", "STATUS=serving 3 stages")   # after the process can serve
    notify("STOPPING=1")                            # when a drain begins

The variable is read here and not in `cli.py` because systemd sets it for the process itself,
not for configuration. See sd_notify(3).
"""

from __future__ import annotations

import logging
import os
import socket

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
