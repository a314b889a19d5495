"""Zoo core contract (docs/internals.md): import, manifest, load_block, tokenizer_dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from blockllm.zoo import (
    CheckpointError,
    IntegrityError,
    ModelExistsError,
    UnknownModelError,
    Zoo,
    ZooError,
    block_id,
)


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_import_manifest_and_blocks(tmp_path, tiny_checkpoint, family):
    src = tiny_checkpoint(family)
    zoo = Zoo(tmp_path / "zoo")
    seen = []
    m = zoo.import_checkpoint(src, "base", progress=lambda i, n: seen.append((i, n)))
    layers = m.config["num_hidden_layers"]
    assert seen[-1] == (layers + 2, layers + 2)
    assert m.name == "base" and m.model_type == family and m.dtype == "float32"
    assert len(m.chain) == layers + 2
    assert m.tie_word_embeddings is (family == "qwen2")
    assert m.generation["eos_token_id"] == 1
    assert zoo.manifest("base") == m
    assert zoo.list_models() == ["base"]

    hf = _hf_tensors(src)
    embed = zoo.load_block(m.chain[0])
    assert list(embed) == ["embed_tokens.weight"]
    assert torch.equal(embed["embed_tokens.weight"], hf["model.embed_tokens.weight"])
    layer1 = zoo.load_block(m.chain[2])
    prefix = "model.layers.1."
    assert set(layer1) == {k[len(prefix) :] for k in hf if k.startswith(prefix)}
    for rel, t in layer1.items():
        assert torch.equal(t, hf[prefix + rel])
    head = zoo.load_block(m.chain[-1])
    assert set(head) == (
        {"norm.weight"} if family == "qwen2" else {"norm.weight", "lm_head.weight"}
    )
    assert block_id(head) == m.chain[-1]
    assert zoo.block_nbytes(m.chain[0]) == m.block_bytes[0] > 0


def test_tokenizer_dir_loads(tmp_path, tiny_checkpoint):
    from transformers import AutoTokenizer

    src = tiny_checkpoint("llama")
    zoo = Zoo(tmp_path)
    zoo.import_checkpoint(src, "a")
    zoo.import_checkpoint(src, "b")
    assert zoo.tokenizer_dir("a") == zoo.tokenizer_dir("b")  # stored once
    tok = AutoTokenizer.from_pretrained(zoo.tokenizer_dir("a"))
    ref = AutoTokenizer.from_pretrained(src)
    assert tok("hello world").input_ids == ref("hello world").input_ids


def test_reimport_same_checkpoint_dedups_everything(tmp_path, tiny_checkpoint):
    zoo = Zoo(tmp_path)
    a = zoo.import_checkpoint(tiny_checkpoint("llama"), "a")
    files = sorted(zoo.iter_block_files())
    b = zoo.import_checkpoint(tiny_checkpoint("llama"), "b")
    assert a.chain == b.chain
    assert sorted(zoo.iter_block_files()) == files


def test_existing_name_needs_force(tmp_path, tiny_checkpoint):
    zoo = Zoo(tmp_path)
    zoo.import_checkpoint(tiny_checkpoint("llama"), "m")
    with pytest.raises(ModelExistsError, match="already exists"):
        zoo.import_checkpoint(tiny_checkpoint("qwen2"), "m")
    m = zoo.import_checkpoint(tiny_checkpoint("qwen2"), "m", force=True)
    assert zoo.manifest("m").model_type == "qwen2" == m.model_type


def test_unknown_model_and_bad_names(tmp_path, tiny_checkpoint):
    zoo = Zoo(tmp_path)
    with pytest.raises(UnknownModelError, match="nope"):
        zoo.manifest("nope")
    for bad in ("", "../x", "a b", ".hidden", "x/y"):
        with pytest.raises(ZooError, match="invalid model name"):
            zoo.import_checkpoint(tiny_checkpoint("llama"), bad)
    with pytest.raises(CheckpointError, match="not found"):
        zoo.import_checkpoint(tmp_path / "missing", "x")


def test_load_block_detects_corruption(tmp_path, tiny_checkpoint):
    zoo = Zoo(tmp_path)
    m = zoo.import_checkpoint(tiny_checkpoint("llama"), "m")
    path = zoo.block_path(m.chain[1])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=m.chain[1]):
        zoo.load_block(m.chain[1])
    assert zoo.load_block(m.chain[1], verify=False)  # readable, just wrong
    path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        zoo.load_block(m.chain[1])


def test_malformed_manifest_is_an_integrity_error(tmp_path, tiny_checkpoint):
    zoo = Zoo(tmp_path)
    m = zoo.import_checkpoint(tiny_checkpoint("llama"), "m")
    path = tmp_path / "models" / "m.json"
    doc = json.loads(path.read_text())
    doc["chain"] = doc["chain"][:-1]
    path.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="chain of"):
        zoo.manifest("m")
    path.write_text("{not json")
    with pytest.raises(IntegrityError, match="malformed manifest"):
        zoo.manifest("m")
    report = zoo.verify()
    assert [(b.kind, b.id) for b in report.bad] == [("manifest", "m")]
    with pytest.raises(IntegrityError):
        zoo.gc()  # cannot know what a broken manifest references: delete nothing
    assert all(zoo.has_block(b) for b in m.chain)
