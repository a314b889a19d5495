"""The Launcher starts children from the main thread only (issue 14's soak finding): a child
arms PR_SET_PDEATHSIG, which the kernel fires when the *thread* that started it ends, so a
broker restarted from a helper thread died as soon as that thread returned."""

from __future__ import annotations

import threading

from blockllm.client.launcher import Launcher
from blockllm.client.launcher.launcher import LaunchError


def test_starting_a_child_off_the_main_thread_is_refused_at_once():
    launcher = Launcher()
    errors: list[BaseException] = []

    def start() -> None:
        try:
            launcher.start_planner(object())
        except BaseException as e:  # checked below, on the main thread
            errors.append(e)

    t = threading.Thread(target=start, name="chaos")
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], LaunchError), errors
    assert "'chaos'" in str(errors[0]) and "main thread" in str(errors[0])
    assert launcher._children() == []  # nothing was started
    launcher.stop()
