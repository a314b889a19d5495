"""Hostile messages at a real worker process (issue 14, item 2): 3000 mutated FORWARD, RESULT,
SPECULATE and KV_SHARD messages arrive on its DEALER from the broker's side (the test is the
broker: a real ROUTER, `FakeBroker`), with shapes that have a zero dimension beside huge ones,
dims that overflow, wrong dtypes, sizes, fields and stage keys. The worker must drop or refuse
each one and stay up; then a valid request still answers the tokens HF `generate` gives.

Before the fix a zero-byte tensor of shape (2**62, 2**62, 0) passed the size checks and
`torch.empty` raised in the IO thread, which took the worker down.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import msgpack
import pytest
import torch

from blockllm.broker import frames
from blockllm.broker.protocol import Forward, Kind, ProtocolError, Release, TensorMeta
from blockllm.client.launcher import Launcher
from tests.integration.cluster import SLOW_BEAT, FakeBroker, hf_greedy, worker_config

N_FUZZ = 3000
PROMPT = [11, 23, 5, 77, 140, 9]
HIDDEN = 64  # the tiny llama's hidden size
KINDS = (Kind.FORWARD, Kind.RESULT, Kind.SPECULATE, Kind.KV_SHARD)
ODD = [-1, 0, 1, 7, 2**31, 2**63 - 1, -(2**63), 1e308, float("nan"), "", "x" * 300, None, [], {}]
SHAPES = [
    [0, 2**62],
    [2**62, 2**62, 0],
    [0, 2**64 - 1],
    [1 << 40, 1 << 40],
    [-1, 4],
    [1] * 9,
    [],
    [1, HIDDEN],
    [len(PROMPT), HIDDEN],
    [len(PROMPT)],
    [4, 1, 2, 16],
    [4, 0, 2, 16],
    [2**31, 0],
]
DTYPES = ["float32", "int64", "bfloat16", "uint8", "complex64", "", "float64"]


def mutated(rng: random.Random, keys: list[str]) -> list[bytes]:
    """One hostile message: a plausible header of one of KINDS with some fields replaced."""
    kind = rng.choice(KINDS)
    shape = rng.choice(SHAPES)
    dtype = rng.choice(DTYPES)
    meta = [dtype, shape]
    stage = rng.choice([keys[0], keys[1], "ab" * 32, ""])
    stages = rng.choice([[keys[0]], [keys[1]], [keys[0], keys[1]], [keys[1], keys[0]], []])
    rid = f"f{rng.randrange(50)}"
    if kind is Kind.FORWARD:
        header = [rid, rng.randrange(5), stages, rng.choice([0, 3, 6, 2**40]), 64]
        header += [0.0, 0, 1.0, 0, [meta], rng.choice([0, 3, 25]), rng.choice([[], [1, 2], [-5]])]
    elif kind is Kind.SPECULATE:
        header = [rid, 1, stages, rng.choice([0, 6, -1]), 64, rng.choice([0.0, -1.0, 2.0])]
        header += [0.0, 0, 1.0, 0, [meta], 0]
    elif kind is Kind.KV_SHARD:
        header = [rng.randrange(9), rid, stage, rng.choice([0, 1, 2**40]), 64, [meta, meta]]
    else:  # RESULT: a worker-bound one makes no sense at all
        header = [rid, 1, rng.randrange(-5, 5), 0.0, [meta]]
    for _ in range(rng.randrange(3)):  # a field or two of the wrong type or range
        header[rng.randrange(len(header))] = rng.choice(ODD)
    n_metas = 2 if kind is Kind.KV_SHARD else 1
    try:
        nbytes = math.prod(shape) * frames.ITEMSIZE.get(dtype, 1)
    except TypeError:
        nbytes = 0
    nbytes = nbytes if 0 <= nbytes <= 4096 and rng.random() < 0.8 else rng.randrange(64)
    tensors = [rng.randbytes(nbytes) for _ in range(n_metas)]
    if rng.random() < 0.1:
        tensors = tensors[:-1]
    return [kind.value, msgpack.packb(header, use_bin_type=True), *tensors]


@pytest.mark.timeout(240)
def test_worker_survives_hostile_messages_and_still_answers_hf_equal(zoo: Path, llama: Path):
    want = hf_greedy(llama, PROMPT, 4)
    broker = FakeBroker()
    try:
        with Launcher(stop_timeout=10) as launcher:
            cfg = worker_config(
                broker.endpoint, zoo, "w0", ["m:0-3", "m:3-6"], heartbeat_interval_s=SLOW_BEAT
            )
            proc = launcher.start_worker("w0", cfg)
            peer, ready, _ = broker.recv_kind({Kind.READY}, timeout=60)
            keys = [s.key for s in sorted(ready.stages, key=lambda s: s.start)]
            rng = random.Random(1414)
            for i in range(N_FUZZ):
                broker.sock.send_multipart([peer, *mutated(rng, keys)])
                if i % 100 == 0:
                    broker.send(peer, Release(f"f{i % 50}"))
            for i in range(50):
                broker.send(peer, Release(f"f{i}"))
            # a valid request, both stages in one hop, decoded step by step
            x, past, got = torch.tensor(PROMPT), 0, []
            for step in range(len(want)):
                fwd = Forward("ok", step, tuple(keys), past, 64, tensors=(frames.meta_of(x),))
                broker.send(peer, fwd, [x])
                while True:
                    _, msg, _ = broker.recv_kind({Kind.RESULT, Kind.ERROR}, timeout=60)
                    if msg.request_id == "ok":
                        break
                assert msg.KIND is Kind.RESULT, msg
                got.append(msg.token_id)
                past, x = past + len(x), torch.tensor([msg.token_id])
            assert got == want
            assert launcher.exitcode(proc) is None, "the worker died"
    finally:
        broker.close()


def test_shapes_with_a_zero_dimension_beside_huge_ones_are_refused_at_decode():
    for shape in ([0, 2**62], [2**62, 2**62, 0], [2**31, 0]):
        header = msgpack.packb(["r", 1, 0, 0.0, [["float32", shape]]], use_bin_type=True)
        with pytest.raises(ProtocolError):
            frames.decode([Kind.RESULT.value, header, b""])
    ok = [Kind.RESULT.value, msgpack.packb(["r", 1, 0, 0.0, [["float32", [0, HIDDEN]]]])]
    msg, tensors = frames.decode([*ok, b""])
    assert msg.tensors == (TensorMeta("float32", (0, HIDDEN)),) and tensors[0].numel() == 0
