"""PEFT LoRA adapters in the zoo: import (base by name, content or --base), adapter blocks,
scaling, refusals, ls/du/verify, export that PEFT loads, rm + gc, an adapter on a fine-tune."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from blockllm.zoo import CheckpointError, UnknownModelError, UnsupportedModelError, Zoo
from blockllm.zoo.lora import train_lora


@pytest.fixture(scope="module")
def base(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def adapter(base: Path, tmp_path_factory) -> Path:
    """Random-initialised (lora_B non-zero) PEFT adapter: q,v,down of layers 1-2, rsLoRA, a
    rank pattern for down_proj."""
    out = tmp_path_factory.mktemp("ad") / "a"
    return train_lora(
        base,
        out,
        (1, 2),
        rank=4,
        alpha=8,
        targets=("q_proj", "v_proj", "down_proj"),
        rslora=True,
        steps=0,
        rank_pattern={"down_proj": 2},
    )


def _zoo(tmp_path: Path, base: Path) -> Zoo:
    z = Zoo(tmp_path / "zoo")
    z.import_checkpoint(base, "base")
    return z


def test_import_stores_one_block_per_layer_with_peft_scaling(tmp_path, base, adapter):
    z = _zoo(tmp_path, base)
    m = z.import_adapter(adapter, "ad")  # base found by content: the config names its folder
    bm = z.manifest("base")
    assert m.adapter["base"] == "base" and m.chain == bm.chain and m.tokenizer == bm.tokenizer
    assert [p for p, _ in m.adapter_blocks] == [2, 3]  # layers 1, 2 are chain positions 2, 3
    block = z.load_block(m.adapter_blocks[0][1])
    assert sorted(block) == sorted(
        f"{mod}.{t}"
        for mod in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
        for t in ("lora_A", "lora_B", "scaling")
    )
    assert block["self_attn.q_proj.lora_A"].shape == (4, 64)
    assert block["mlp.down_proj.lora_A"].shape[0] == 2  # rank_pattern
    assert float(block["self_attn.q_proj.scaling"]) == pytest.approx(8 / math.sqrt(4))
    assert float(block["mlp.down_proj.scaling"]) == pytest.approx(8 / math.sqrt(2))
    assert z.manifest("ad").adapter_blocks == m.adapter_blocks  # round-trips through JSON


def test_base_by_name_or_flag_and_clear_errors(tmp_path, base, adapter):
    z = _zoo(tmp_path, base)
    moved = tmp_path / "copy"
    shutil.copytree(adapter, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/base"  # last path component = zoo model name
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    assert z.import_adapter(moved, "by-name").adapter["base"] == "base"
    cfg["base_model_name_or_path"] = "someone/elsewhere"
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownModelError, match="--base"):
        z.import_adapter(moved, "lost")
    assert z.import_adapter(moved, "flagged", base="base").adapter["base"] == "base"
    with pytest.raises(UnsupportedModelError, match="itself an adapter"):
        z.import_adapter(moved, "stacked", base="flagged")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"r": 8}, "r=8"),  # the tensors are rank 4: misshapen for the config
    ],
)
def test_refusals(tmp_path, base, adapter, change, match):
    z = _zoo(tmp_path, base)
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    cfg = {**json.loads((bad / "adapter_config.json").read_text()), **change}
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises((UnsupportedModelError, CheckpointError), match=match):
        z.import_adapter(bad, "bad")
    assert not z.has_model("bad")


def test_refuses_targets_outside_decoder_projections(tmp_path, base):
    from safetensors.torch import save_file

    z = _zoo(tmp_path, base)
    bad = tmp_path / "emb"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4})
    )
    save_file(
        {
            "base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64),
            "base_model.model.lm_head.lora_B.weight": torch.zeros(128, 2),
        },
        str(bad / "adapter_model.safetensors"),
    )
    with pytest.raises(UnsupportedModelError, match=r"lm_head.*q_proj, k_proj"):
        z.import_adapter(bad, "emb", base="base")


def test_ls_du_verify_rm_gc_cover_adapters(tmp_path, base, adapter):
    z = _zoo(tmp_path, base)
    m = z.import_adapter(adapter, "ad")
    usage = z.du()
    ad_bytes = sum(m.adapter["block_bytes"])
    assert usage["models"]["ad"]["unique_bytes"] == ad_bytes > 0
    assert usage["models"]["ad"]["logical_bytes"] == usage["models"]["base"]["logical_bytes"] + (
        ad_bytes
    )
    assert usage["models"]["ad"]["adapter"]["ranks"] == [2, 4]
    assert z.verify().ok
    victim = z.block_path(m.adapter_blocks[0][1])
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    report = z.verify()
    assert [(b.id, b.models) for b in report.bad] == [(m.adapter_blocks[0][1], ("ad",))]
    victim.unlink()
    z.remove("ad")
    report = z.gc()
    assert report.removed_blocks == 1  # the other adapter block; the base's all stay
    assert all(z.has_block(b) for b in z.manifest("base").chain)


def test_adapter_keeps_its_chain_when_the_base_is_removed(tmp_path, base, adapter):
    z = _zoo(tmp_path, base)
    m = z.import_adapter(adapter, "ad")
    z.remove("base")
    z.gc()
    assert all(z.has_block(b) for b in m.all_blocks())
    assert z.verify().ok


def test_export_is_a_peft_folder_with_the_same_outputs(tmp_path, base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    z = _zoo(tmp_path, base)
    z.import_adapter(adapter, "ad")
    out = z.export("ad", tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 33, 70]])

    def logits(folder: Path) -> torch.Tensor:
        hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        return PeftModel.from_pretrained(hf, folder).eval()(ids).logits

    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(ids).logits
        want, got = logits(adapter), logits(out)
    assert not torch.allclose(want, plain, atol=1e-3)  # the adapter changes the outputs
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_adapter_on_a_full_finetune(tmp_path, base, tiny_checkpoint):
    other = tiny_checkpoint("llama", seed=1)  # same family, every tensor different
    z = _zoo(tmp_path, base)
    z.import_checkpoint(other, "ft")
    ad = train_lora(other, tmp_path / "ad", (0, 3), rank=2, targets=("o_proj",), steps=0)
    m = z.import_adapter(ad, "ad-ft")  # found by content among two models of one family
    assert m.adapter["base"] == "ft" and m.chain == z.manifest("ft").chain
    assert len(m.adapter_blocks) == 4


def test_models_lora_cli_trains_a_real_adapter(tmp_path, base):
    from click.testing import CliRunner

    from blockllm.client.cli import cli

    out = tmp_path / "trained"
    r = CliRunner().invoke(
        cli,
        [
            "models",
            "lora",
            str(base),
            str(out),
            "--layers",
            "2-3",
            "--rank",
            "2",
            "--steps",
            "2",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--targets",
            "k_proj,up_proj",
        ],
    )
    assert r.exit_code == 0, r.output
    record = json.loads((out / ".blockllm-lora.json").read_text())
    assert len(record["losses"]) == 2
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["k_proj", "up_proj"] and cfg["r"] == 2
    z = _zoo(tmp_path, base)
    r = CliRunner().invoke(
        cli, ["zoo", "import", str(out), "--name", "tr", "--zoo", str(z.root), "--json"]
    )
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["adapter"] == {
        "base": "base",
        "layers": 2,
        "bytes": info["adapter"]["bytes"],
        "ranks": [2],
        "targets": ["k_proj", "up_proj"],
    }
    # B is zero at init and trained for two steps: the adapter is not a no-op
    block = z.load_block(z.manifest("tr").adapter_blocks[0][1])
    assert block["self_attn.k_proj.lora_B"].abs().sum() > 0


@pytest.mark.parametrize(
    ("family", "want"), [("llama", ["q_proj", "v_proj"]), ("phi3", ["qkv_proj"])]
)
def test_models_lora_default_targets_are_the_models_own(tmp_path, tiny_checkpoint, family, want):
    """Phi-3 has no q_proj/v_proj (one fused qkv_proj): without --targets the CLI used to end in
    a peft traceback there; the default is the module that exists, and the adapter imports."""
    from click.testing import CliRunner

    from blockllm.client.cli import cli

    ckpt, out = tiny_checkpoint(family), tmp_path / "ad"
    r = CliRunner().invoke(cli, ["models", "lora", str(ckpt), str(out), "--steps", "0"])
    assert r.exit_code == 0, r.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == want
    z = Zoo(tmp_path / "zoo")
    z.import_checkpoint(ckpt, "base")
    m = z.import_adapter(out, "ad")
    assert len(m.adapter_blocks) == len(z.manifest("base").chain) - 2  # every decoder layer
