"""Measured memory of a benchmarked system, and running an in-process system in its own process.

Accounted bytes (weights + KV pools, what each system says it holds) can be argued with; the
measured figure is PSS (proportional set size: each page divided by the processes sharing it,
psutil `memory_full_info().pss`) summed over ALL the processes of the system, sampled every
`interval_s` while it serves the trace: the peak and the mean.

Reading PSS is not free: the kernel walks the page tables of each process (smaps_rollup;
measured 50-350 ms for a SmolLM2 worker on the loaded 2-core machine), on the benchmark's CPU
time, which the systems share. So the sampler waits at least `DUTY` ^-1 times as long as its
last reading took between two readings: it takes at most ~5% of one core, whatever the load.

Which processes: the children of this benchmark process (recursively) while the system runs.
`blockllm`'s are its broker, workers (and planner); every in-process baseline (per_model,
hf_generate, hf_batched) is run by `run_isolated` in a fresh spawned process of its own, so
its figure holds its interpreter, torch, its models and caches, and nothing left over from
another system or from this process (the trace, the blockllm client).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from blockllm.client.bench.trace import Outcome

SPAWN = multiprocessing.get_context("spawn")
DUTY = 0.05  # at most this fraction of the time is spent reading PSS


def pss_of_children() -> tuple[int, int]:
    """(PSS bytes summed over this process's descendants, how many were read)."""
    import psutil

    total, n = 0, 0
    for p in psutil.Process().children(recursive=True):
        try:
            total += p.memory_full_info().pss
            n += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # exited between the listing and the read
    return total, n


class PssSampler:
    """Samples `pss_of_children` in a thread between start() and stop()."""

    def __init__(
        self, interval_s: float = 0.5, read: Callable[[], tuple[int, int]] = pss_of_children
    ):
        self.interval_s = interval_s
        self.read = read
        self.samples: list[int] = []
        self.processes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-pss")
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            t = time.monotonic()
            self._sample()
            took = time.monotonic() - t
            if self._stop.wait(max(self.interval_s, took / DUTY - took)):
                return

    def _sample(self) -> None:
        pss, n = self.read()
        if n:
            self.samples.append(pss)
            self.processes = max(self.processes, n)

    def stop(self) -> dict[str, Any]:
        """Stop (one last sample) and summarise: pss_peak_bytes, pss_mean_bytes, samples."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        s = self.samples
        return {
            "pss_peak_bytes": max(s) if s else None,
            "pss_mean_bytes": int(sum(s) / len(s)) if s else None,
            "pss_samples": len(s),
            "pss_processes": self.processes,
        }


# -- an in-process system in its own process ----------------------------------------------------


def _say_stderr(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _child(target: str, kwargs: dict[str, Any], conn: Any, parent: int) -> None:
    from blockllm.broker.lifecycle import arm_parent_death

    arm_parent_death(parent)
    module, _, func = target.partition(":")
    fn = getattr(importlib.import_module(module), func)
    outcomes, facts = fn(**kwargs, say=_say_stderr, on_start=lambda: conn.send_bytes(b"start"))
    doc = {"outcomes": [dataclasses.asdict(o) for o in outcomes], "facts": facts}
    conn.send_bytes(json.dumps(doc).encode())
    conn.close()


class IsolatedError(RuntimeError):
    """The system's process died or returned nothing."""


def run_isolated(
    target: str, kwargs: dict[str, Any], interval_s: float = 0.5
) -> tuple[list[Outcome], dict[str, Any]]:
    """Run `target(**kwargs, say=, on_start=)` -> (outcomes, facts) in a spawned process; PSS is
    sampled from the moment it calls on_start() (its replay begins) until it answers. Returns
    (outcomes, facts + the PSS summary)."""
    recv, send = SPAWN.Pipe(duplex=False)
    proc = SPAWN.Process(
        target=_child, args=(target, kwargs, send, os.getpid()), daemon=True, name="bench-system"
    )
    proc.start()
    send.close()
    sampler = PssSampler(interval_s)
    try:
        msg = recv.recv_bytes()
        if msg == b"start":
            sampler.start()
            msg = recv.recv_bytes()
        pss = sampler.stop()
    except EOFError:
        sampler.stop()
        proc.join(5)
        raise IsolatedError(f"{target} exited with code {proc.exitcode} before answering") from None
    finally:
        recv.close()
    proc.join(30)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    doc = json.loads(msg)
    outcomes = [Outcome(**o) for o in doc["outcomes"]]
    return outcomes, {**doc["facts"], **pss}
