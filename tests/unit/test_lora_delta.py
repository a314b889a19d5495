"""The batched LoRA delta (worker/lora_delta.py over worker/lora_pool.py) equals each row's own
adapter applied alone, PEFT's way, for runs that are consecutive or not, ranks that need
padding (two pools of padded ranks for one module), adapters that target different modules,
rows without an adapter and slots scattered in their pool; through the grouped kernel and
the fallback. The pools are the only copy of an adapter's weights, and all of it is counted."""

import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockllm.worker.lora import AdapterCache, AdapterMap, LoraHooks
from blockllm.worker.lora_delta import plan_step


def _id(name: str) -> str:
    """A block id (64 hex digits) for a test's short block name."""
    return hashlib.sha256(name.encode()).hexdigest()


def _store(blocks: dict[str, dict]) -> dict[str, dict]:
    return {_id(n): t for n, t in blocks.items()}


def _tensors(targets: dict[str, tuple[int, int]], rank: int, scaling: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (d_in, d_out) in targets.items():
        out[f"{m}.lora_A"] = torch.randn(rank, d_in, generator=g)
        out[f"{m}.lora_B"] = torch.randn(d_out, rank, generator=g)
        out[f"{m}.scaling"] = torch.tensor(scaling)
    return out


class _Stage:
    """What AdapterCache.admit reads of a stage: its layers and their hooks."""

    def __init__(self, dims: dict[str, tuple[int, int]], n_layers: int) -> None:
        self.layers = []
        for _ in range(n_layers):
            layer = nn.Module()
            for m, (d_in, d_out) in dims.items():
                setattr(layer, m, nn.Linear(d_in, d_out, bias=False))
            self.layers.append(layer)
        self.lora = LoraHooks(self.layers)


def _admit(cache, stage, rid, blocks):
    return cache.admit(rid, [(p, _id(n)) for p, n in blocks.items()], [(1, stage)])


def _check(step, maps, lengths, blocks, dims):
    n = sum(lengths)
    owner = [m for m, k in zip(maps, lengths, strict=True) for _ in range(k)]
    for (j, name), deltas in step.modules.items():
        x = torch.randn(n, dims[name][0])
        out = torch.randn(n, dims[name][1])
        want = out.clone()
        for row, m in enumerate(owner):
            if (1 + j) not in m or f"{name}.lora_A" not in blocks[m[1 + j]]:
                continue
            t = blocks[m[1 + j]]
            a, b, s = t[f"{name}.lora_A"], t[f"{name}.lora_B"], float(t[f"{name}.scaling"])
            want[row] += F.linear(F.linear(x[row], a), b) * s
        for d in deltas:
            d.apply(x, out)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [16, 12])  # 16: the grouped kernel; 12: unaligned -> fallback
def test_step_equals_each_row_alone(d):
    dims = {"q_proj": (d, d), "v_proj": (d, 2 * d)}
    q = {"q_proj": dims["q_proj"]}
    blocks = {  # two layers; "a", "c" and "e" change only q at layer 0, "b" both modules
        "a0": _tensors(q, 3, 0.5, 1),
        "a1": _tensors(dims, 3, 0.5, 2),
        "b0": _tensors(dims, 5, 2.0, 3),
        "b1": _tensors(dims, 5, 2.0, 4),
        "c0": _tensors(q, 2, 1.0, 5),
        "e0": _tensors(q, 20, 1.0, 6),  # rank 20: the pool of padded rank 32
    }
    blocks = _store(blocks)
    cache = AdapterCache(blocks.__getitem__)
    stage = _Stage(dims, 2)
    a = _admit(cache, stage, "ra", {1: "a0", 2: "a1"})
    b = _admit(cache, stage, "rb", {1: "b0", 2: "b1"})
    c = _admit(cache, stage, "rc", {1: "c0"})
    e = _admit(cache, stage, "re", {1: "e0"})
    base = AdapterMap()
    maps = [a, base, a, b, e, c, a]  # a's rows in three runs, one base entry between
    lengths = [1, 2, 3, 1, 1, 2, 1]
    step = plan_step(1, stage.lora.modules, maps, lengths, cache)
    assert step is not None and set(step.modules) == {
        (0, "q_proj"),
        (0, "v_proj"),
        (1, "q_proj"),
        (1, "v_proj"),
    }
    assert len(step.modules[(0, "q_proj")]) == 2  # ranks <= 16 and rank 20 (padded 32)
    assert all(md.kernel == (d % 8 == 0) for ds in step.modules.values() for md in ds)
    assert step.copy_bytes == 0  # every pool read in place
    _check(step, maps, lengths, blocks, dims)
    # the tensors as read are gone: the pools are all there is, and all of it is counted
    names = ("a0", "a1", "b0", "b1", "c0", "e0")
    pools = {id(p): p for n in names for p in _pools(cache, n)}
    assert cache.total_bytes == sum(p.nbytes for p in pools.values())
    slot = 4 * 16 * (d + d)  # one rank-16 slot of q_proj, fp32
    # q: a0 b0 c0 at layer 0, a1 b1 at 1 (rank 16); v: b0, a1 b1 (rank 16); q: e0 (rank 32)
    assert cache.total_bytes == 5 * slot + 3 * 4 * 16 * (d + 2 * d) + 4 * 32 * (d + d)


def _pools(cache, name):
    return [p for places in cache._blocks[_id(name)].places.values() for p in places.values()]


def test_scattered_slots_get_a_compact_stack_and_freed_slots_are_reused():
    d = 16
    dims = {"q_proj": (d, d)}
    blocks = _store({f"f{i}": _tensors(dims, 8, 1.0, i) for i in range(8)})
    cache = AdapterCache(blocks.__getitem__, idle_limit=8)
    stage = _Stage(dims, 1)
    maps = [_admit(cache, stage, f"r{i}", {1: f"f{i}"}) for i in range(8)]
    (pool,) = _pools(cache, "f0")
    assert [pool.slot_of[_id(f"f{i}")] for i in range(8)] == list(range(8))
    near = plan_step(1, stage.lora.modules, maps[2:5], [1, 2, 1], cache)
    (md,) = near.modules[(0, "q_proj")]
    assert near.copy_bytes == 0 and md.a.untyped_storage().data_ptr() == (
        pool.a.untyped_storage().data_ptr()
    )  # a view of the pool
    _check(near, maps[2:5], [1, 2, 1], blocks, dims)
    far = plan_step(1, stage.lora.modules, [maps[7], maps[0]], [2, 1], cache)
    assert far.copy_bytes == 2 * 4 * 16 * (d + d)  # 6 empty groups between: 2 slots copied
    _check(far, [maps[7], maps[0]], [2, 1], blocks, dims)
    version = cache.version
    cache.idle_limit = 0
    cache.release("r3")
    assert not cache.has(_id("f3")) and cache.version != version
    again = _admit(cache, stage, "r3b", {1: "f3"})  # read again, into the freed slot 3
    assert pool.slot_of[_id("f3")] == 3
    _check(plan_step(1, stage.lora.modules, [again], [1], cache), [again], [1], blocks, dims)
    for i in range(8):
        cache.release(f"r{i}")
    cache.release("r3b")
    assert cache.total_bytes == 0 and cache.resident() == ()


def test_hooks_reuse_the_plan_while_the_batch_keeps_its_shape():
    stage = _Stage({"q_proj": (8, 8)}, 1)
    layer = stage.layers[0]
    assert type(layer.q_proj).__name__ == "LoraLinear" and "q_proj.weight" in layer.state_dict()
    ones = {
        "q_proj.lora_A": torch.ones(2, 8),
        "q_proj.lora_B": torch.ones(8, 2),
        "q_proj.scaling": torch.tensor(1.0),
    }
    cache = AdapterCache(_store({"a": ones, "b": ones}).__getitem__)
    m = _admit(cache, stage, "r1", {1: "a"})
    hooks = stage.lora
    hooks.prepare(1, [m, AdapterMap()], [1, 1], cache)
    first = hooks.step
    x = torch.ones(1, 2, 8)
    out = layer.q_proj(x)
    base = F.linear(x, layer.q_proj.weight)
    torch.testing.assert_close(out[0, 1], base[0, 1])  # the base row untouched
    torch.testing.assert_close(out[0, 0], base[0, 0] + 16.0)  # 8 * 2 per output
    hooks.finish()
    torch.testing.assert_close(layer.q_proj(x), base)  # no step: the plain projection
    hooks.prepare(1, [_admit(cache, stage, "r2", {1: "a"}), AdapterMap()], [1, 1], cache)
    assert hooks.step is first
    hooks.prepare(1, [m, AdapterMap()], [2, 1], cache)
    assert hooks.step is not first
    second = hooks.step
    _admit(cache, stage, "r3", {1: "b"})  # a new block placed: the pools changed
    hooks.prepare(1, [m, AdapterMap()], [2, 1], cache)
    assert hooks.step is not second


def test_batch_order_puts_one_adapter_and_same_targets_together():
    q1, q2 = AdapterMap({1: "q1"}, ["q_proj"], 1), AdapterMap({1: "q2"}, ["q_proj"], 0)
    k, base = AdapterMap({1: "k"}, ["k_proj"]), AdapterMap()
    batch = [q1, k, q2, base, q1, k]
    got = sorted(batch, key=lambda e: e.order)
    assert [e.key for e in got] == [e.key for e in (base, k, k, q2, q1, q1)]
