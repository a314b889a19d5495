"""Importer: explicit key map and shape checks, shards, dtypes, tying, export, dedup, du."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from blockllm.zoo import CheckpointError, UnsupportedModelError, Zoo
from tests.unit.test_zoo_support import finetune, read_tensors, rewrite_checkpoint


def _assert_roundtrip(zoo: Zoo, name: str, src, out) -> None:
    from transformers import AutoModelForCausalLM

    zoo.export(name, out)
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(out)
    got = model.state_dict()
    want = read_tensors(src)
    for key, t in want.items():
        assert got[key].dtype == t.dtype, key
        assert torch.equal(got[key], t), key
    if model.config.tie_word_embeddings:
        assert torch.equal(got["lm_head.weight"], want["model.embed_tokens.weight"])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_export_roundtrip(tmp_path, tiny_checkpoint, family):
    from transformers import AutoTokenizer

    src = tiny_checkpoint(family)
    zoo = Zoo(tmp_path / "zoo")
    zoo.import_checkpoint(src, "m")
    _assert_roundtrip(zoo, "m", src, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("a test").input_ids == AutoTokenizer.from_pretrained(src)("a test").input_ids
    if family == "qwen2":  # tied + q/k/v bias
        assert "lm_head.weight" not in zoo.load_block(zoo.manifest("m").chain[-1])
        assert "self_attn.q_proj.bias" in zoo.load_block(zoo.manifest("m").chain[1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes_preserved(tmp_path, tiny_checkpoint, dtype):
    src = tiny_checkpoint("llama", dtype=dtype)
    zoo = Zoo(tmp_path / "zoo")
    m = zoo.import_checkpoint(src, "m")
    assert m.dtype == dtype
    assert all(t.dtype == getattr(torch, dtype) for t in zoo.load_block(m.chain[1]).values())
    _assert_roundtrip(zoo, "m", src, tmp_path / "out")


@pytest.mark.parametrize("with_index", [True, False])
def test_sharded_checkpoint(tmp_path, tiny_checkpoint, with_index):
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint("llama")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    if not with_index:
        (sharded / "model.safetensors.index.json").unlink()
    zoo = Zoo(tmp_path / "zoo")
    a = zoo.import_checkpoint(src, "single")
    b = zoo.import_checkpoint(sharded, "sharded")
    assert a.chain == b.chain
    assert len(b.source["files"]) > 2


def test_finetune_dedups_untouched_layers_and_du(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint("llama", layers=6)
    ft = finetune(src, tmp_path / "ft", {2: 1e-2, 3: 1e-2})
    zoo = Zoo(tmp_path / "zoo")
    base = zoo.import_checkpoint(src, "base")
    tuned = zoo.import_checkpoint(ft, "ft")
    same = [p for p in range(8) if base.chain[p] == tuned.chain[p]]
    assert same == [0, 1, 2, 5, 6, 7]  # positions 3, 4 are layers 2, 3
    usage = zoo.du()
    sizes = {p.stem: p.stat().st_size for p in zoo.iter_block_files()}
    layer_bytes = sizes[tuned.chain[3]] + sizes[tuned.chain[4]]
    base_bytes = sum(sizes[b] for b in base.chain)
    assert usage["logical_bytes"] == 2 * base_bytes
    assert usage["blocks"] == 10 and usage["shared_blocks"] == 6
    assert usage["models"]["ft"]["unique_bytes"] == layer_bytes
    assert usage["models"]["base"]["logical_bytes"] == base_bytes
    unique_total = base_bytes + layer_bytes
    assert abs(usage["physical_bytes"] - unique_total) <= 0.05 * unique_total
    assert usage["physical_bytes"] < 0.7 * usage["logical_bytes"]


def test_unsupported_model_type_is_refused_by_name(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        num_hidden_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=50,
        max_position_embeddings=32,
    )
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "neox")
    zoo = Zoo(tmp_path / "zoo")
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt_neox' is not supported"):
        zoo.import_checkpoint(tmp_path / "neox", "g")
    assert zoo.list_models() == []


def _with_config(tmp_path, tiny_checkpoint, family: str, **changes):
    src = tiny_checkpoint(family)
    out = shutil.copytree(src, tmp_path / f"{family}-edited")
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("family", "changes", "feature"),
    [
        ("gemma3_text", {"use_bidirectional_attention": True}, "bidirectional attention"),
        ("gpt2", {"add_cross_attention": True}, "cross-attention layers"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
            "rope_type 'dynamic'",
        ),
        (
            "phi3",
            {
                "rope_parameters": {
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": [1.0] * 8,
                    "long_factor": [2.0] * 8,
                },
                "original_max_position_embeddings": 256,
            },
            "rope_type 'longrope'",
        ),
        ("qwen2", {"quantization_config": {"quant_method": "gptq"}}, "quantized"),
    ],
)
def test_unservable_features_are_refused_by_name(
    tmp_path, tiny_checkpoint, family, changes, feature
):
    """A family the generic path serves, with a config feature it cannot: refused at import,
    the message naming the feature; nothing is written."""
    src = _with_config(tmp_path, tiny_checkpoint, family, **changes)
    zoo = Zoo(tmp_path / "zoo")
    with pytest.raises(UnsupportedModelError, match=feature):
        zoo.import_checkpoint(src, "m")
    assert list(zoo.iter_block_files()) == [] and zoo.list_models() == []


def _edited(tmp_path, tiny_checkpoint, edit) -> tuple[Zoo, object]:
    src = tiny_checkpoint("llama")
    tensors = read_tensors(src)
    edit(tensors)
    return Zoo(tmp_path / "zoo"), rewrite_checkpoint(src, tmp_path / "bad", tensors)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            "missing tensor model.layers.1.mlp.up_proj.weight",
        ),
        (lambda t: t.pop("lm_head.weight"), "missing tensor lm_head.weight"),
        (
            lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}),
            r"k_proj.weight has shape \[64, 64\], config implies \[32, 64\]",
        ),
        (
            lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}),
            "unexpected tensor model.layers.0.extra.weight",
        ),
        (
            lambda t: t.update({"model.layers.9.input_layernorm.weight": torch.zeros(64)}),
            "unexpected tensor model.layers.9.input_layernorm.weight",
        ),
    ],
)
def test_bad_tensors_are_named_and_nothing_is_written(tmp_path, tiny_checkpoint, edit, match):
    zoo, bad = _edited(tmp_path, tiny_checkpoint, edit)
    with pytest.raises(CheckpointError, match=match):
        zoo.import_checkpoint(bad, "m")
    assert list(zoo.iter_block_files()) == [] and zoo.list_models() == []


def test_missing_folder_and_config(tmp_path, tiny_checkpoint):
    zoo = Zoo(tmp_path / "zoo")
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        zoo.import_checkpoint(tmp_path / "nowhere", "m")
    src = shutil.copytree(tiny_checkpoint("llama"), tmp_path / "noconfig")
    (src / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        zoo.import_checkpoint(src, "m")
    # HF fills the missing sizes with its defaults: the tensors then do not fit them
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="missing tensor"):
        zoo.import_checkpoint(src, "m")


def test_tied_checkpoint_that_stores_lm_head(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint("qwen2")
    tensors = read_tensors(src)
    embed = tensors["model.embed_tokens.weight"]
    zoo = Zoo(tmp_path / "zoo")
    ref = zoo.import_checkpoint(src, "ref")
    dup = rewrite_checkpoint(src, tmp_path / "dup", {**tensors, "lm_head.weight": embed.clone()})
    assert zoo.import_checkpoint(dup, "dup").chain == ref.chain  # stored once, same blocks
    differs = {**tensors, "lm_head.weight": embed + 1}
    bad = rewrite_checkpoint(src, tmp_path / "differs", differs)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs"):
        zoo.import_checkpoint(bad, "bad")


def test_checkpoint_without_tokenizer_or_generation(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint("mistral")
    bare = rewrite_checkpoint(src, tmp_path / "bare", read_tensors(src))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (bare / name).unlink()
    zoo = Zoo(tmp_path / "zoo")
    m = zoo.import_checkpoint(bare, "bare")
    assert m.tokenizer is None and m.generation == {}
    assert zoo.tokenizer_dir("bare") is None


def test_a_checkpoint_mixing_dtypes_is_imported_and_served_in_its_dominant_one(
    tmp_path, tiny_checkpoint
):
    """bf16 matrices next to fp32 norms (as many real checkpoints ship): each block keeps its
    tensors' own dtypes in the zoo, the manifest names the dominant dtype, and a worker casts
    to it once at load: the same tokens as the all-bf16 checkpoint."""
    from blockllm.worker.items import WorkItem
    from blockllm.worker.worker import Worker, WorkerConfig

    src = tiny_checkpoint("llama")
    tensors = read_tensors(src)
    mixed = {k: v if v.dim() == 1 else v.to(torch.bfloat16) for k, v in tensors.items()}
    uniform = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    zoo = Zoo(tmp_path / "zoo")
    m = zoo.import_checkpoint(rewrite_checkpoint(src, tmp_path / "mixed", mixed), "mixed")
    zoo.import_checkpoint(rewrite_checkpoint(src, tmp_path / "bf16", uniform), "bf16")
    assert m.dtype == "bfloat16"
    layer = zoo.load_block(m.chain[1])
    assert layer["input_layernorm.weight"].dtype == torch.float32  # stored as imported
    assert layer["self_attn.q_proj.weight"].dtype == torch.bfloat16
    out = {}
    for name in ("mixed", "bf16"):
        w = Worker(zoo, WorkerConfig(kv_budget_bytes=1 << 22))
        key = w.load_stage(name, 0, len(m.chain)).key
        assert w.stages()[0].dtype == "bfloat16"
        toks, past = [5, 9, 17, 33, 2], 0
        for step in range(6):
            item = WorkItem("r", step, (key,), past, tokens=torch.tensor(toks[past:]))
            w.submit(replace(item, max_total_len=16))
            (res,) = w.step()
            assert res.error is None, res.message
            past = len(toks)
            toks.append(res.token_id)
        out[name] = toks
    assert out["mixed"] == out["bf16"]
