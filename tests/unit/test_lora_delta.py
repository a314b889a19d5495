"""The batched LoRA delta (worker/lora_delta.py) equals each row's own adapter applied alone,
PEFT's way, for runs that are consecutive or not, ranks that need padding, adapters that target
different modules and rows without an adapter; through the grouped kernel and the fallback."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockllm.worker.lora import AdapterMap, LoraHooks
from blockllm.worker.lora_delta import StackCache, plan_step


def _block(targets: dict[str, tuple[int, int]], rank: int, scaling: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        m: (torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g), scaling)
        for m, (d_in, d_out) in targets.items()
    }


@pytest.mark.parametrize("d", [16, 12])  # 16: the grouped kernel; 12: unaligned -> fallback
def test_step_equals_each_row_alone(d):
    dims = {"q_proj": (d, d), "v_proj": (d, 2 * d)}
    blocks = {  # two layers; "a" and "c" change only q at layer 0, "b" both modules
        "a0": _block({"q_proj": dims["q_proj"]}, 3, 0.5, 1),
        "a1": _block(dims, 3, 0.5, 2),
        "b0": _block(dims, 5, 2.0, 3),
        "b1": _block(dims, 5, 2.0, 4),
        "c0": _block({"q_proj": dims["q_proj"]}, 2, 1.0, 5),
    }
    a, b = AdapterMap({1: "a0", 2: "a1"}), AdapterMap({1: "b0", 2: "b1"})
    c, base = AdapterMap({1: "c0"}), AdapterMap()
    maps = [a, base, a, b, c, a]  # a's rows in three runs, one base entry between
    lengths = [1, 2, 3, 1, 2, 1]
    stacks = StackCache()
    targets = {0: ["q_proj", "v_proj"], 1: ["q_proj", "v_proj"]}
    step = plan_step(1, targets, maps, lengths, blocks.__getitem__, stacks, torch.device("cpu"))
    assert step is not None and set(step.modules) == {
        (0, "q_proj"),
        (0, "v_proj"),
        (1, "q_proj"),
        (1, "v_proj"),
    }
    assert all(md.kernel == (d % 8 == 0) for md in step.modules.values())
    n = sum(lengths)
    owner = [m for m, k in zip(maps, lengths, strict=True) for _ in range(k)]
    for (j, name), md in step.modules.items():
        x = torch.randn(n, dims[name][0])
        out = torch.randn(n, dims[name][1])
        want = out.clone()
        for row, m in enumerate(owner):
            w = blocks[m[1 + j]].get(name) if (1 + j) in m else None
            if w is not None:
                want[row] += F.linear(F.linear(x[row], w[0]), w[1]) * w[2]
        md.apply(x, out)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # the same batch again: the stacks are reused; another batch: idle stacks beyond the budget go
    builds = stacks.builds
    plan_step(1, targets, maps, lengths, blocks.__getitem__, stacks, torch.device("cpu"))
    assert stacks.builds == builds
    stacks.idle_bytes = 0
    plan_step(1, targets, [b], [1], blocks.__getitem__, stacks, torch.device("cpu"))
    assert stacks.total_bytes == sum(
        4 * 8 * (dims[m][0] + dims[m][1]) for m in ("q_proj", "v_proj") for _ in range(2)
    )  # b alone at both layers: rank 5 padded to 8, fp32


def test_hooks_reuse_the_plan_while_the_batch_keeps_its_shape():
    layer = nn.Module()
    layer.q_proj = nn.Linear(8, 8, bias=False)
    hooks = LoraHooks([layer])
    assert type(layer.q_proj).__name__ == "LoraLinear" and "q_proj.weight" in layer.state_dict()

    class Cache:
        def weights(self, bid):
            assert bid == "a"
            return {"q_proj": (torch.ones(2, 8), torch.ones(8, 2), 1.0)}

    m = AdapterMap({1: "a"}, ["q_proj"])
    hooks.prepare(1, [m, AdapterMap()], [1, 1], Cache(), torch.device("cpu"))
    first = hooks.step
    x = torch.ones(1, 2, 8)
    out = layer.q_proj(x)
    base = F.linear(x, layer.q_proj.weight)
    torch.testing.assert_close(out[0, 1], base[0, 1])  # the base row untouched
    torch.testing.assert_close(out[0, 0], base[0, 0] + 16.0)  # 8 * 2 per output
    hooks.finish()
    torch.testing.assert_close(layer.q_proj(x), base)  # no step: the plain projection
    hooks.prepare(
        1, [AdapterMap({1: "a"}, ["q_proj"]), AdapterMap()], [1, 1], Cache(), torch.device("cpu")
    )
    assert hooks.step is first
    hooks.prepare(1, [m, AdapterMap()], [2, 1], Cache(), torch.device("cpu"))
    assert hooks.step is not first


def test_batch_order_puts_one_adapter_and_same_targets_together():
    q1, q2 = AdapterMap({1: "q1"}, ["q_proj"]), AdapterMap({1: "q2"}, ["q_proj"])
    k, base = AdapterMap({1: "k"}, ["k_proj"]), AdapterMap()
    batch = [q1, k, q2, base, q1, k]
    got = sorted(batch, key=lambda e: e.order)
    assert [e.key for e in got] == [e.key for e in (base, k, k, q1, q1, q2)]
