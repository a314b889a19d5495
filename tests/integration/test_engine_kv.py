"""The stage engine's KV accounting (admission, eviction and replay), seeded sampling, typed
refusals of bad work items, and `bench stage`; workers driven in-process by
tests/integration/engine_driver.py, compared with HF where tokens are produced.
"""

from __future__ import annotations

import pytest
import torch

from blockllm.worker.errors import ErrorCode
from blockllm.worker.items import SamplingParams, WorkItem
from blockllm.worker.worker import Worker, WorkerConfig
from blockllm.zoo import Zoo
from tests.integration.engine_driver import (
    Driver,
    cuts_to_hops,
    hf_greedy,
    make_reqs,
)

# ---------------------------------------------------------------------------------------------
# KV accounting: admission, eviction, replay


def _one(w: Worker, rid: str, key: str, toks: list[int], past: int, total: int = 0):
    w.submit(WorkItem(rid, 0, (key,), past, tokens=torch.tensor(toks), max_total_len=total))
    (res,) = w.step()
    return res


def test_admission_past_capacity_is_cache_full_and_pages_are_reused(tiny_zoo) -> None:
    zoo, _ckpt = tiny_zoo("llama")
    page_bytes = 2 * 16 * 2 * 16 * 4  # K+V x 16 tokens x 2 kv heads x head_dim 16 x fp32
    per_req = 4 * 2 * page_bytes  # 4 layers x ceil(32 / 16) pages
    w = Worker(zoo, WorkerConfig(kv_budget_bytes=2 * per_req + page_bytes - 1))
    key = w.load_stage("m", 0, 6).key
    stats = w.kv_stats()
    assert (stats.total_bytes, stats.used_bytes, stats.n_pages) == (2 * per_req, 0, 16)
    for rid in ("a", "b", "c"):
        w.submit(WorkItem(rid, 0, (key,), 0, tokens=torch.arange(3, 8), max_total_len=32))
    res = {r.request_id: r for r in w.step()}
    assert res["a"].error is None and res["b"].error is None
    assert res["c"].error == ErrorCode.CACHE_FULL  # a typed refusal; queued ones are not evicted
    stats = w.kv_stats()
    assert (stats.used_bytes, stats.free_bytes) == (2 * per_req, 0)
    a_pages = set(w.kv.get(key, "a").pages.flatten().tolist())
    w.release("a")
    assert w.kv_stats().used_bytes == per_req
    assert _one(w, "c", key, list(range(3, 8)), 0, 32).error is None
    assert set(w.kv.get(key, "c").pages.flatten().tolist()) == a_pages  # freed pages reused
    huge = _one(w, "d", key, [3], 0, 10_000)
    assert huge.error == ErrorCode.CACHE_FULL and "whole pool" in huge.message
    w.release("b"), w.release("c")
    assert w.kv_stats().used_bytes == 0 and w.stats().kv_free_bytes == 2 * per_req


def test_eviction_gives_kv_miss_and_replay_matches_hf(tiny_zoo) -> None:
    zoo, ckpt = tiny_zoo("llama")
    per_req = 4 * 2 * 4096  # 4 layers x 2 pages (max_total_len <= 32)
    w = Worker(zoo, WorkerConfig(kv_budget_bytes=2 * per_req))
    key = w.load_stage("m", 0, 6).key
    pa, pb, pc = (make_reqs(300, plan=((n, 0, 1),), seed=n)[0].prompt for n in (7, 9, 11))
    a = [*pa, _one(w, "a", key, pa, 0, 17).token_id]
    b = [*pb, _one(w, "b", key, pb, 0, 32).token_id]
    b.append(_one(w, "b", key, b[-1:], len(b) - 1).token_id)  # a is now least recently used
    assert _one(w, "c", key, pc, 0, 32).error is None  # room made by evicting idle a
    miss = _one(w, "a", key, a[-1:], len(a) - 1)
    assert miss.error == ErrorCode.KV_MISS
    a.append(_one(w, "a", key, a, 0, 17).token_id)  # replay: the whole history, past_len 0
    while len(a) < len(pa) + 10:
        res = _one(w, "a", key, a[-1:], len(a) - 1)
        assert res.error is None, res.message
        a.append(res.token_id)
    assert a[len(pa) :] == hf_greedy(str(ckpt), tuple(pa), 10)
    assert _one(w, "b", key, b[-1:], len(b) - 1).error == ErrorCode.KV_MISS  # b made room


# ---------------------------------------------------------------------------------------------
# seeded sampling


def _sampled(zoo: Zoo, seeds, only=None, lose_kv_at=None) -> dict[str, list[int]]:
    """Run PLAN's requests (or just those in `only`, all joining at once) with sampling."""
    reqs = make_reqs(zoo.manifest("m").config["vocab_size"])
    for r, seed in zip(reqs, seeds, strict=True):
        r.sampling = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=seed)
    if only is not None:
        reqs = [r for r in reqs if r.rid in only]
        for r in reqs:
            r.join = 0
    driver = Driver(cuts_to_hops(zoo, "m", [[0, 3], [3, 6]])).add(*reqs)
    if lose_kv_at is None:
        return driver.run()
    driver.run(pause_at=lose_kv_at)  # a few ticks, then r0's KV on the 2nd worker is lost
    driver.hops[1][0].release("r0")
    outs = driver.run()
    assert driver.reqs["r0"].replays == 1
    return outs


def test_seeded_sampling_is_reproducible(tiny_zoo) -> None:
    zoo, _ckpt = tiny_zoo("llama")
    seeds = list(range(100, 108))
    first = _sampled(zoo, seeds)
    assert _sampled(zoo, seeds) == first  # same seeds, same tokens
    assert _sampled(zoo, seeds, lose_kv_at=4) == first  # a replay samples the same again
    for rid in ("r0", "r3"):  # alone, without the others in its batches: the same tokens
        assert _sampled(zoo, seeds, only={rid})[rid] == first[rid]
    other = _sampled(zoo, [s + 1000 for s in seeds])
    assert sum(other[k] != first[k] for k in first) >= 6


# ---------------------------------------------------------------------------------------------
# typed refusals


def test_submit_refuses_bad_items_with_typed_errors(tiny_zoo) -> None:
    from blockllm.worker.errors import BadRequest, QueueFull, UnknownStage

    zoo, _ckpt = tiny_zoo("llama")
    w = Worker(zoo, WorkerConfig(kv_budget_bytes=1 << 20, queue_capacity=2))
    a, b, c = (w.load_stage("m", lo, hi).key for lo, hi in ((0, 2), (2, 4), (4, 6)))
    ids = torch.tensor([3, 4, 5])

    def item(**kw) -> WorkItem:
        base = dict(request_id="r", step=0, stage_keys=(a, b), past_len=0, tokens=ids)
        return WorkItem(**{**base, **kw})

    bad = [
        item(stage_keys=()),
        item(stage_keys=(a, c)),  # not consecutive
        item(tokens=None, hidden=torch.zeros(3, 64)),  # the first stage embeds
        item(stage_keys=(b,), tokens=ids),  # ...and this one does not
        item(stage_keys=(b,), tokens=None, hidden=torch.zeros(3, 65)),
        item(tokens=torch.tensor([3, 100_000])),  # id outside the vocab
        item(tokens=torch.tensor([[3]])),
        item(past_len=-1),
        item(past_len=True),
        item(max_total_len=2),  # less than past_len + T
        item(stage_keys=(a, b, c), sampling=SamplingParams(temperature=-1.0)),
    ]
    for it in bad:
        with pytest.raises(BadRequest) as e:
            w.submit(it)
        assert e.value.code == ErrorCode.BAD_REQUEST
    with pytest.raises(UnknownStage):
        w.submit(item(stage_keys=("nope",)))
    w.submit(item())
    with pytest.raises(BadRequest, match="already has an item queued"):
        w.submit(item())
    w.submit(item(request_id="s"))
    with pytest.raises(QueueFull):
        w.submit(item(request_id="t"))
    assert w.stats().queue_depths[a] == 2 and w.stats().free_slots == 4
    w.unload_stage(b)  # queued items routed through it fail, typed, at the next step
    assert {(r.request_id, r.error) for r in w.step()} == {
        ("r", ErrorCode.UNKNOWN_STAGE),
        ("s", ErrorCode.UNKNOWN_STAGE),
    }
    assert w.kv_stats().used_bytes == 0


def test_bench_stage_json_shape(tiny_checkpoint) -> None:
    import json

    from click.testing import CliRunner

    from blockllm.client.cli import cli

    ckpt = tiny_checkpoint("qwen2")
    args = ["bench", "stage", "--model-dir", str(ckpt), "--batches", "1,3", "--steps", "2"]
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["bench"], doc["model"], doc["dtype"]) == ("stage", ckpt.name, "float32")
    assert [r["batch"] for r in doc["results"]] == [1, 3]
    for r in doc["results"]:
        assert r["blockllm_tok_s"] > 0 and r["hf_tok_s"] > 0 and r["ratio"] > 0
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0 and "ratio" in table.stdout
    bad = CliRunner().invoke(
        cli, ["bench", "stage", "--model-dir", str(ckpt), "--dtype", "bfloat16"]
    )
    assert bad.exit_code != 0
