"""A FORWARD whose LoRA blocks the worker lacks waits for the loader thread's read, not the
compute thread (worker/adapter_loads.py): one job per missing block set, blocks on their way
never asked for twice, ready FORWARDs handed back in arrival order, failures refused typed."""

import torch

from blockllm.broker.protocol import ErrorCode, Forward
from blockllm.worker.adapter_loads import AdapterLoads
from blockllm.worker.loader import AdapterJob, Loaded
from blockllm.worker.lora import AdapterCache

A, B, C = "a" * 64, "b" * 64, "c" * 64


def _block(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "self_attn.q_proj.lora_A": torch.randn(2, 8, generator=g),
        "self_attn.q_proj.lora_B": torch.randn(8, 2, generator=g),
        "self_attn.q_proj.scaling": torch.tensor(0.5),
    }


def _forward(rid: str, *blocks: str) -> Forward:
    return Forward(
        rid, 0, ("k",), 0, 4, adapter_positions=(1, 2)[: len(blocks)], adapter_blocks=blocks
    )


def test_forwards_wait_for_their_blocks_and_go_in_arrival_order():
    def never(bid: str) -> dict[str, torch.Tensor]:
        raise AssertionError(f"the compute thread read {bid}")  # everything comes via jobs

    cache = AdapterCache(never)
    jobs: list[AdapterJob] = []
    loads = AdapterLoads(cache, jobs.append, lambda: "float32")
    x = [torch.zeros(4, dtype=torch.int64)]
    assert not loads.park(Forward("base", 0, ("k",), 0, 4), x)  # no adapter: straight on
    assert loads.park(_forward("r1", A, B), x)
    assert loads.park(_forward("r2", B), x)  # B already on its way: no second job
    assert loads.park(_forward("r3", C), x)
    assert loads.park(_forward("gone", A), x)
    loads.drop("gone")
    assert [j.blocks for j in jobs] == [(A, B), (C,)] and jobs[0].dtype == "float32"
    assert len(loads) == 4 - 1

    ready, failed = loads.loaded(Loaded(jobs[1], {C: _block(3)}))
    assert [m.request_id for m, _ in ready] == ["r3"] and not failed
    ready, failed = loads.loaded(Loaded(jobs[0], {A: _block(1), B: _block(2)}))
    assert [m.request_id for m, _ in ready] == ["r1", "r2"] and not failed
    assert cache.has(A) and cache.refs(A) == 0 and len(loads) == 0
    assert not loads.park(_forward("r4", A, C), x)  # resident now: no wait
    cache.acquire("r4", [A, C])  # what the engine's admit does: no read either
    assert cache.loads == 3


def test_a_block_that_cannot_be_had_refuses_the_forwards_waiting_for_it():
    cache = AdapterCache(lambda bid: {})
    jobs: list[AdapterJob] = []
    loads = AdapterLoads(cache, jobs.append, lambda: "float32")
    x = [torch.zeros(4, dtype=torch.int64)]
    loads.park(_forward("r1", A), x)
    loads.park(_forward("r2", B), x)
    refused: list[tuple[str, ErrorCode, bool]] = []
    forwarded: list[str] = []
    loads.on_loaded(
        Loaded(jobs[0], error=FileNotFoundError("no block " + A)),
        lambda m, _t: forwarded.append(m.request_id),
        lambda m, code, _text, retry: refused.append((m.request_id, code, retry)),
    )
    assert refused == [("r1", ErrorCode.BAD_REQUEST, False)] and not forwarded
    loads.on_loaded(
        Loaded(jobs[1], {B: {"mlp.up_proj.weight": torch.zeros(2, 2)}}),  # not an adapter block
        lambda m, _t: forwarded.append(m.request_id),
        lambda m, code, _text, retry: refused.append((m.request_id, code, retry)),
    )
    assert refused[-1] == ("r2", ErrorCode.BAD_REQUEST, False) and not cache.has(B)
    loads.limit = 0
    assert loads.waits(
        _forward("r3", C), x, lambda m, code, _t, retry: refused.append((m.request_id, code, retry))
    )
    assert refused[-1] == ("r3", ErrorCode.QUEUE_FULL, True)
