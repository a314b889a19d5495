"""The engine applies LoRA per request on shared stages: base + three adapters in ONE batched
forward per stage per step, equal to HF + PEFT greedy; adapter blocks refcounted per request;
the base weights never change; bad adapter items are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from blockllm.worker.errors import BadRequest
from blockllm.worker.worker import Worker, WorkerConfig, WorkItem, stage_key
from blockllm.zoo import Zoo
from blockllm.zoo.lora import train_lora

ADAPTERS = {  # name -> (layers, rank, rslora)
    "a1": ((0, 3), 4, False),
    "a2": ((1, 2), 8, True),
    "a3": ((3, 3), 2, False),
}
SEPARATE = (("q_proj", "v_proj"), ("o_proj", "gate_proj", "up_proj", "down_proj"), ("k_proj",))
TARGETS = {  # family -> the projections of a1, a2, a3
    "llama": SEPARATE,
    "qwen2": SEPARATE,
    "phi3": (("qkv_proj",), ("o_proj", "gate_up_proj", "down_proj"), ("qkv_proj",)),
    "gpt2": (("c_attn",), ("c_proj", "c_fc"), ("c_attn",)),  # Conv1D, in attention and MLP
}
PROMPTS = {"base": [1, 2, 3, 4, 5], "a1": [7, 8, 9], "a2": [10, 11, 12, 13], "a3": [5, 6, 7, 8]}


def _setup(tmp: Path, family: str, tiny_checkpoint) -> tuple[Zoo, Path, dict[str, Path]]:
    base = tiny_checkpoint(family)
    folders = {
        n: train_lora(
            base, tmp / n, layers, rank=r, targets=TARGETS[family][i], rslora=rs, steps=0, seed=i
        )
        for i, (n, (layers, r, rs)) in enumerate(ADAPTERS.items())
    }
    z = Zoo(tmp / "zoo")
    z.import_checkpoint(base, "base")
    for n, path in folders.items():
        z.import_adapter(path, n)
    return z, base, folders


def _hf_peft(base: Path, adapter: Path | None, ids: list[int], n: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.eval().generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False
        )
    return out[0, len(ids) :].tolist()


def _worker(z: Zoo) -> tuple[Worker, tuple[str, str]]:
    w = Worker(z, WorkerConfig())
    m = z.manifest("base")
    n = len(m.chain)
    w.load_stage("base", 0, 3)
    w.load_stage("base", 3, n)
    return w, (stage_key(m, 0, 3), stage_key(m, 3, n))


def _weight(layer: torch.nn.Module, target: str) -> torch.Tensor:
    return next(m.weight for n, m in layer.named_modules() if n.endswith(target))


@pytest.mark.parametrize("family", list(TARGETS))
def test_base_and_adapters_batched_in_one_forward_equal_hf_peft(tmp_path, tiny_checkpoint, family):
    """Phi-3's fused qkv_proj/gate_up_proj and GPT-2's Conv1D projections included."""
    z, base, folders = _setup(tmp_path, family, tiny_checkpoint)
    w, keys = _worker(z)
    first = TARGETS[family][0][0]
    q_before = _weight(w.stage_model(keys[0]).layers[0], first).clone()
    steps = 8
    toks = {k: list(v) for k, v in PROMPTS.items()}
    for step in range(steps):
        for name, t in toks.items():
            pairs = z.manifest(name).adapter_blocks
            w.submit(
                WorkItem(
                    name,
                    step,
                    keys,
                    0 if step == 0 else len(t) - 1,
                    tokens=torch.tensor(t if step == 0 else t[-1:]),
                    max_total_len=len(PROMPTS[name]) + steps,
                    adapters=pairs,
                )
            )
        results = w.step()
        assert sorted(r.request_id for r in results) == sorted(toks)
        for r in results:
            assert r.error is None, r.message
            toks[r.request_id].append(r.token_id)
    stats = w.stats()
    # one batched forward per stage per step carried all four requests
    assert stats.forwards == {keys[0]: steps, keys[1]: steps}
    assert stats.items == {keys[0]: 4 * steps, keys[1]: 4 * steps}
    # a1 (layers 0-3) and a2 (1-2) touch stage [0, 3)'s layers 0, 1; all three touch [3, 6)
    assert stats.adapters == {keys[0]: 3, keys[1]: 4}
    for name in PROMPTS:
        got = toks[name][len(PROMPTS[name]) :]
        want = _hf_peft(base, folders.get(name), PROMPTS[name], steps)
        assert got == want, name
    for name in ("a1", "a2"):  # the adapters change outputs (else parity proves nothing)
        assert toks[name][len(PROMPTS[name]) :] != _hf_peft(base, None, PROMPTS[name], steps)
    # no merge: the shared base weights are untouched
    assert torch.equal(_weight(w.stage_model(keys[0]).layers[0], first), q_before)


def test_adapter_blocks_are_refcounted_per_request_and_kept_idle(tmp_path, tiny_checkpoint):
    z, _base, _folders = _setup(tmp_path, "llama", tiny_checkpoint)
    w, keys = _worker(z)
    pairs = z.manifest("a1").adapter_blocks
    for rid in ("r1", "r2"):
        w.submit(WorkItem(rid, 0, keys, 0, tokens=torch.tensor([1, 2]), adapters=pairs))
    assert all(w.adapters.refs(b) == 2 for _, b in pairs)
    assert w.adapters.loads == len(pairs)  # read once for both requests
    w.step()
    w.release("r1")
    assert all(w.adapters.refs(b) == 1 for _, b in pairs)
    w.release("r2")
    assert set(w.adapters.resident()) == {b for _, b in pairs}  # idle, still resident
    w.adapters.idle_limit = 0
    w.release("r2")  # evicts idle blocks beyond the limit
    assert w.adapters.resident() == ()


def test_bad_adapter_items_are_refused(tmp_path, tiny_checkpoint):
    z, _base, _folders = _setup(tmp_path, "llama", tiny_checkpoint)
    w, keys = _worker(z)
    pos, bid = z.manifest("a3").adapter_blocks[0]
    x = torch.tensor([1, 2])
    with pytest.raises(BadRequest, match="no decoder layer"):
        w.submit(WorkItem("r", 0, keys[:1], 0, tokens=x, adapters=((pos, bid),)))
    with pytest.raises(BadRequest, match="missing"):
        w.submit(WorkItem("r", 0, keys, 0, tokens=x, adapters=((pos, "0" * 64),)))
    odd = z.put_block(
        {
            "mlp.w9_proj.lora_A": torch.zeros(2, 64),
            "mlp.w9_proj.lora_B": torch.zeros(64, 2),
            "mlp.w9_proj.scaling": torch.tensor(1.0),
        }
    ).id
    with pytest.raises(BadRequest, match="w9_proj"):
        w.submit(WorkItem("r", 0, keys, 0, tokens=x, adapters=((pos, odd),)))
    assert w.adapters.refs(odd) == 0
    w.submit(WorkItem("r", 0, keys, 0, tokens=x, adapters=((pos, bid),)))  # then a good one
    assert w.step()[0].error is None
