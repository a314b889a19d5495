"""`blockllm serve`'s worker slots: which deaths it heals, when a slot is crash-looping."""

from __future__ import annotations


def test_serve_worker_slots_count_deaths_within_the_window():
    from blockllm.client.launcher.serve import Slots

    slots = Slots(["worker-0", "worker-1"], deaths=3, window_s=60.0)
    assert slots.death("worker-0", 0.0) and slots.death("worker-0", 10.0)
    assert slots.death("worker-1", 11.0)  # slots count apart
    assert not slots.death("worker-0", 20.0)  # the third within 60 s: crash-looping
    assert slots.recent("worker-0") == 3
    assert slots.death("worker-1", 100.0)  # the first one aged out of the window
    assert slots.recent("worker-1") == 1
    assert not slots.death("planner", 0.0)  # not a slot: nothing to restart
    assert not Slots(["w"], deaths=1, window_s=1.0).death("w", 0.0)  # 1 = never
