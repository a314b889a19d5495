"""Speculative stage runs (worker/speculate.py) in-process on a tiny Llama.

The chain [embed | layers 0-1 | layers 2-3 | head] is served as four stages of one Worker,
each a hop of its own (as the broker sends them). Hop 2 speculates on a predicted input: hop
1's input (the paper's prediction), the real input itself (an oracle), or noise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from blockllm.worker.errors import BadRequest
from blockllm.worker.items import WorkItem, WorkResult
from blockllm.worker.speculate import Speculation, relative_distance
from blockllm.worker.worker import Worker, WorkerConfig
from blockllm.zoo import Zoo

CUTS = ((0, 1), (1, 3), (3, 5), (5, 6))  # chain positions of the 4 layers' tiny Llama
SPEC_HOP = 2  # layers 2-3 speculate; hop 1 (layers 0-1) is "stage k"
PROMPT = [5, 17, 3, 99, 42, 8, 61]
NEW = 8

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (stage k input, real) -> guess


@pytest.fixture
def engine(tiny_checkpoint, tmp_path: Path) -> tuple[Worker, list[str]]:
    zoo = Zoo(tmp_path / "zoo")
    zoo.import_checkpoint(tiny_checkpoint("llama"), "tiny")
    worker = Worker(zoo, WorkerConfig(kv_budget_bytes=4 << 20, page_size=4))
    return worker, [worker.load_stage("tiny", a, b).key for a, b in CUTS]


def _one(spec: Speculation, item: WorkItem, real: bool = True) -> WorkResult:
    if real:
        spec.submit(item)
    else:
        spec.worker.submit(item)
    (r,) = spec.step()
    assert r.error is None, r.message
    return r


def _decode(
    spec: Speculation, keys: list[str], rid: str, predict: Predict | None
) -> tuple[list[int], list[str]]:
    """Greedy PROMPT + NEW tokens, hop by hop; hop SPEC_HOP speculates when `predict`."""
    tokens, outcomes, past = list(PROMPT), [], 0
    x: torch.Tensor = torch.tensor(PROMPT)
    total = len(PROMPT) + NEW
    for step in range(NEW):
        hop_k_input = x
        for hop, key in enumerate(keys):
            is_ids = hop == 0
            item = WorkItem(
                rid,
                step,
                (key,),
                past,
                tokens=x if is_ids else None,
                hidden=None if is_ids else x,
                max_total_len=total,
            )
            if hop == SPEC_HOP and predict is not None and past > 0:
                guess = predict(hop_k_input, x)
                # the speculative run: in the real system it overlaps hop k's run
                spec.speculate(WorkItem(rid, step, (key,), past, hidden=guess))
                assert spec.step() == []  # kept, not returned
                outcomes.append(spec.submit(item))
                (r,) = spec.step()
            else:
                r = _one(spec, item)
            hop_k_input = x
            x = r.hidden if r.token_id is None else torch.tensor([r.token_id])
        past = len(tokens)
        tokens.append(int(x[0]))
    spec.release(rid)
    return tokens[len(PROMPT) :], outcomes


def _exact(engine) -> list[int]:
    worker, keys = engine
    out, outcomes = _decode(Speculation(worker, 0.0), keys, "exact", None)
    assert outcomes == []
    return out


def test_tolerance_zero_reruns_and_matches_exact(engine) -> None:
    worker, keys = engine
    exact = _exact(engine)
    spec = Speculation(worker, 0.0)
    before = worker.stats().forwards[keys[SPEC_HOP]]
    out, outcomes = _decode(spec, keys, "r", lambda k_input, real: k_input)
    assert out == exact
    assert outcomes == ["rejected"] * (NEW - 1)  # random layers move the residual stream
    s = spec.stats()
    assert (s.speculated, s.accepted, s.rejected) == (NEW - 1, 0, NEW - 1)
    # every decode step ran the hop twice: once speculatively, once for real
    assert worker.stats().forwards[keys[SPEC_HOP]] - before == NEW + (NEW - 1)


def test_accepted_speculation_returns_without_recompute(engine) -> None:
    worker, keys = engine
    exact = _exact(engine)
    spec = Speculation(worker, 0.0)
    before = worker.stats().forwards[keys[SPEC_HOP]]
    out, outcomes = _decode(spec, keys, "a", lambda k_input, real: real.clone())
    assert out == exact  # parity: an exact prediction is accepted at tolerance 0
    assert outcomes == ["accepted"] * (NEW - 1)
    assert spec.stats().accepted == NEW - 1
    assert spec.last_distance == 0.0
    # one forward per step: the accepted real inputs did not run the hop again
    assert worker.stats().forwards[keys[SPEC_HOP]] - before == NEW


def test_accepted_rewrites_first_layer_kv_from_real_input(engine) -> None:
    """An accepted speculation on a wrong guess: layer 2's K/V at that position equal those
    of an exact run (rewritten from the real input); layer 3's are the speculative pass's."""
    worker, keys = engine
    key = keys[SPEC_HOP]
    h = torch.randn(len(PROMPT) + 1, 64, generator=torch.Generator().manual_seed(1))
    p = len(PROMPT)
    spec = Speculation(worker, tolerance=1e9)
    for rid in ("exact", "spec"):
        _one(spec, WorkItem(rid, 0, (key,), 0, hidden=h[:p], max_total_len=p + 1))
    _one(spec, WorkItem("exact", 1, (key,), p, hidden=h[p:]))
    spec.speculate(WorkItem("spec", 1, (key,), p, hidden=h[p:] + 0.5))
    assert spec.step() == []
    assert spec.submit(WorkItem("spec", 1, (key,), p, hidden=h[p:])) == "accepted"
    (r,) = spec.step()
    assert r.request_id == "spec" and r.step == 1 and r.hidden is not None

    def kv(rid: str) -> tuple[torch.Tensor, torch.Tensor]:
        return worker.export_kv(rid, key, p + 1)  # [layers, len, Hkv, Dh]

    (k_e, v_e), (k_s, v_s) = kv("exact"), kv("spec")
    torch.testing.assert_close(k_s[0], k_e[0])  # first layer: rewritten from the real input
    torch.testing.assert_close(v_s[0], v_e[0])
    torch.testing.assert_close(k_s[1, :p], k_e[1, :p])  # the prefix is untouched
    assert not torch.allclose(v_s[1, p], v_e[1, p])  # deeper: kept from the guess


def test_rejected_speculation_overwrites_its_kv(engine) -> None:
    worker, keys = engine
    key = keys[SPEC_HOP]
    h = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    spec = Speculation(worker, tolerance=0.01)
    for rid in ("exact", "spec"):
        _one(spec, WorkItem(rid, 0, (key,), 0, hidden=h[:5], max_total_len=6))
    r_exact = _one(spec, WorkItem("exact", 1, (key,), 5, hidden=h[5:]))
    spec.speculate(WorkItem("spec", 1, (key,), 5, hidden=h[5:] * 2))
    assert spec.step() == []
    assert spec.submit(WorkItem("spec", 1, (key,), 5, hidden=h[5:])) == "rejected"
    assert spec.last_distance == pytest.approx(1.0)
    (r,) = spec.step()
    torch.testing.assert_close(r.hidden, r_exact.hidden)
    spec_kv, exact_kv = worker.export_kv("spec", key, 6), worker.export_kv("exact", key, 6)
    for a, b in zip(spec_kv, exact_kv, strict=True):
        torch.testing.assert_close(a, b)


def test_real_input_overtaking_a_queued_speculation(engine) -> None:
    worker, keys = engine
    key = keys[SPEC_HOP]
    h = torch.randn(4, 64)
    spec = Speculation(worker, tolerance=1.0)
    _one(spec, WorkItem("o", 0, (key,), 0, hidden=h[:3], max_total_len=4))
    spec.speculate(WorkItem("o", 1, (key,), 3, hidden=h[3:]))
    assert spec.submit(WorkItem("o", 1, (key,), 3, hidden=h[3:])) == "overtaken"
    (r,) = spec.step()
    assert r.step == 1 and r.hidden is not None
    assert spec.stats().overtaken == 1 and spec.stats().accepted == 0


def test_only_single_token_decodes_speculate(engine) -> None:
    worker, keys = engine
    spec = Speculation(worker, tolerance=1.0)
    with pytest.raises(BadRequest):
        spec.speculate(WorkItem("p", 0, (keys[SPEC_HOP],), 0, hidden=torch.randn(3, 64)))
    with pytest.raises(ValueError):
        Speculation(worker, tolerance=-1.0)
    assert relative_distance(torch.ones(4), torch.ones(4)) == 0.0


def test_a_speculation_carries_its_own_tolerance(engine) -> None:
    """The worker process gives each run the tolerance of its model (SPECULATE.tolerance);
    an accepted result can be answered at once (`on_accept`) instead of by the next step."""
    worker, keys = engine
    key = keys[SPEC_HOP]
    h = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    accepted: list = []
    spec = Speculation(worker, tolerance=0.0, on_accept=accepted.append)
    for rid in ("loose", "strict"):
        _one(spec, WorkItem(rid, 0, (key,), 0, hidden=h[:3], max_total_len=4))
    spec.speculate(WorkItem("loose", 1, (key,), 3, hidden=h[3:] * 1.5), tolerance=0.6)
    spec.speculate(WorkItem("strict", 1, (key,), 3, hidden=h[3:] * 1.5))  # the default, 0
    assert spec.step() == []
    assert spec.submit(WorkItem("loose", 1, (key,), 3, hidden=h[3:])) == "accepted"
    assert spec.submit(WorkItem("strict", 1, (key,), 3, hidden=h[3:])) == "rejected"
    (ready,) = accepted
    assert ready.request_id == "loose" and ready.step == 1
    (r,) = spec.step()  # only the rejected one ran again
    assert r.request_id == "strict"
    with pytest.raises(BadRequest):
        spec.speculate(WorkItem("loose", 2, (key,), 4, hidden=h[3:]), tolerance=-1.0)
