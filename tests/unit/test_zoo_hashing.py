"""Block ids hash canonical content: independent of tensor order and file metadata."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from blockllm.zoo import Zoo, block_id
from blockllm.zoo.hashing import file_block_id


def _block() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "self_attn.q_proj.weight": torch.randn(8, 4, generator=g),
        "input_layernorm.weight": torch.randn(4, generator=g),
        "mlp.up_proj.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),
    }


def test_id_ignores_insertion_order():
    b = _block()
    assert block_id(b) == block_id(dict(reversed(list(b.items()))))


def test_id_ignores_file_metadata_and_order(tmp_path):
    b = _block()
    save_file(b, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    rev = dict(reversed(list(b.items())))
    save_file(rev, str(tmp_path / "b.safetensors"), metadata={"source": "elsewhere", "x": "1"})
    a_bytes = (tmp_path / "a.safetensors").read_bytes()
    assert a_bytes != (tmp_path / "b.safetensors").read_bytes()
    assert file_block_id(tmp_path / "a.safetensors") == block_id(b)
    assert file_block_id(tmp_path / "b.safetensors") == block_id(b)


def test_id_depends_on_name_dtype_shape_and_bytes():
    b = _block()
    ref = block_id(b)
    renamed = {("x." + k if k.startswith("mlp") else k): v for k, v in b.items()}
    assert block_id(renamed) != ref
    q = b["self_attn.q_proj.weight"]
    assert block_id({**b, "self_attn.q_proj.weight": q.reshape(4, 8)}) != ref  # same bytes
    assert block_id({**b, "self_attn.q_proj.weight": q.view(torch.int32)}) != ref  # same bytes
    bumped = q.clone()
    bumped[0, 0] += 1
    assert block_id({**b, "self_attn.q_proj.weight": bumped}) != ref
    # non-contiguous views hash by value
    t = torch.randn(4, 6).t()
    assert block_id({"w": t}) == block_id({"w": t.contiguous()})


def test_put_block_is_idempotent_and_named_by_id(tmp_path):
    zoo = Zoo(tmp_path)
    b = _block()
    bid, n, written = zoo.put_block(b)
    assert written
    assert bid == block_id(b)
    path = zoo.block_path(bid)
    assert path == tmp_path / "blocks" / bid[:2] / f"{bid}.safetensors"
    mtime = path.stat().st_mtime_ns
    assert zoo.put_block(dict(reversed(list(b.items())))) == (bid, n, False)
    assert path.stat().st_mtime_ns == mtime  # present: not rewritten
    got = zoo.load_block(bid)
    assert set(got) == set(b) and all(torch.equal(got[k], b[k]) for k in b)
    assert got["mlp.up_proj.weight"].dtype == torch.bfloat16
