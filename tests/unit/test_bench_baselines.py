"""`bench multitenant`'s baselines and measurements: open/closed-loop arrivals, hf_batched's
padded batch (same tokens as one request at a time), measured PSS of the system's processes,
an in-process system run in a process of its own."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from blockllm.client.bench.arrivals import Arrivals
from blockllm.client.bench.memory import PssSampler, run_isolated
from blockllm.client.bench.trace import Outcome, TraceRequest


def _trace(n: int, gap: float = 1.0, model: str = "m") -> list[TraceRequest]:
    return [TraceRequest(i, i * gap, model, (5, 6, 7 + i), 4) for i in range(n)]


def test_open_loop_hands_out_requests_at_their_trace_times() -> None:
    a = Arrivals(_trace(3))
    assert [r.index for r, _ in a.due(0.0)] == [0]
    assert a.due(0.5) == [] and a.next_at() == 1.0
    assert [r.index for r, _ in a.due(2.5)] == [1, 2]
    assert a.exhausted() and a.next_at() is None


def test_closed_loop_sends_the_next_request_when_one_finishes() -> None:
    a = Arrivals(_trace(5, gap=100.0), clients=2)
    first = a.due(0.0)
    assert [r.index for r, _ in first] == [0, 1] and a.next_at() is None
    assert a.due(3.0) == []  # both clients are waiting on their requests
    a.finished(first[0][1])
    ((req, o),) = a.due(4.0)
    assert req.index == 2 and o.arrival_s == 4.0  # sent when its client was free, not at 200 s
    with pytest.raises(ValueError):
        Arrivals(_trace(1), clients=0)


def test_hf_batched_rows_equal_one_request_at_a_time(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from blockllm.client.bench.hf_systems import generate_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32)
    model.eval()
    reqs = [
        TraceRequest(0, 0.0, "m", (3, 9, 27, 81, 5, 17, 40, 2), 6),
        TraceRequest(1, 0.0, "m", (11, 12), 9),
        TraceRequest(2, 0.0, "m", (50, 60, 70, 80, 90), 3),
    ]
    batched = generate_batch(model, reqs)
    for req, (tokens, times) in zip(reqs, batched, strict=True):
        ((alone, _),) = generate_batch(model, [req])
        assert tokens == alone, req.index  # left padding + mask change nothing
        assert 1 <= len(tokens) <= req.max_new_tokens and len(times) == len(tokens)
        assert times == sorted(times)
    # the short answer's last token came out before the batch's longest one finished
    assert batched[2][1][-1] <= batched[1][1][-1]


def test_pss_is_summed_over_children_and_follows_their_memory() -> None:
    code = "import sys, time; x = b'x' * (64 << 20); print('ok', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ok"
        sampler = PssSampler(interval_s=0.05).start()
        time.sleep(0.3)
        pss = sampler.stop()
    finally:
        child.kill()
        child.wait(10)
    assert pss["pss_processes"] >= 1 and pss["pss_samples"] >= 2
    assert pss["pss_peak_bytes"] >= 64 << 20  # the child's 64 MiB are all in it
    assert pss["pss_peak_bytes"] >= pss["pss_mean_bytes"] > 0


def test_sampler_summary_from_given_reads() -> None:
    reads = iter([(100, 2), (300, 3), (0, 0), (200, 2)])
    sampler = PssSampler(interval_s=60.0, read=lambda: next(reads, (200, 2)))
    sampler._sample(), sampler._sample(), sampler._sample()
    out = sampler.stop()
    assert out["pss_peak_bytes"] == 300 and out["pss_processes"] == 3
    assert out["pss_samples"] == 3 and out["pss_mean_bytes"] == 200  # (100+300+200)/3


def fake_system(n: int, say: Callable[[str], None], on_start: Callable[[], None]):
    """A stand-in system run by run_isolated's child (importable by module path)."""
    say("fake: starting")
    on_start()
    data = b"y" * (32 << 20)
    time.sleep(0.5)
    outcomes = [Outcome(i, "m", 0.0, 0.1, 0.2, len(data) // (32 << 20)) for i in range(n)]
    return outcomes, {"peak_weight_bytes": 7}


def test_run_isolated_returns_outcomes_facts_and_the_child_pss() -> None:
    outcomes, facts = run_isolated(
        "tests.unit.test_bench_baselines:fake_system", {"n": 3}, interval_s=0.05
    )
    assert [o.index for o in outcomes] == [0, 1, 2] and outcomes[0].tokens == 1
    assert facts["peak_weight_bytes"] == 7
    assert facts["pss_peak_bytes"] >= 32 << 20 and facts["pss_samples"] >= 2


def test_per_model_engines_hold_private_copies_not_zoo_file_mappings(zoo: Path) -> None:
    import gc

    from blockllm.client.bench.per_model import PerModelConfig, PerModelServer
    from blockllm.zoo import Zoo

    blocks = set(Zoo(zoo).manifest("m").chain)

    def mapped() -> set[str]:
        gc.collect()
        maps = Path("/proc/self/maps").read_text()
        return {b for b in blocks if b in maps}

    for private, expect_mapped in ((False, True), (True, False)):
        cfg = PerModelConfig(str(zoo), 1 << 30, 1 << 20, private_weights=private)
        server = PerModelServer(cfg, lambda _m: None)
        server.load("m")
        assert bool(mapped()) is expect_mapped, private  # a mapped file's pages are shared
        server.evict("m")
