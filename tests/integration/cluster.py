"""Helpers of the multi-process tests: zoos of tiny checkpoints, HF references, clusters.

Everything runs for real: checkpoints on disk, processes started by the same `Launcher` that
`blockllm serve` uses, sockets on 127.0.0.1 with ports the OS picks. Waits are on READY,
STATUS and sentinels with deadlines; nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch
import zmq

from blockllm.broker import frames
from blockllm.broker.protocol import Message
from blockllm.broker.sockets import bound_endpoint, make_socket
from blockllm.client.launcher.local import FAST_BEAT_S, local_cluster
from blockllm.client.launcher.local import LocalCluster as Cluster
from blockllm.client.launcher.local import worker_config as worker_config

FAST_BEAT = FAST_BEAT_S  # liveness interval of test clusters: a lost worker is noticed in ~1 s
SLOW_BEAT = 10.0  # for workers of a FakeBroker, which does not ping


def make_zoo(root: Path, checkpoints: Mapping[str, Path]) -> Path:
    """A zoo at `root` holding each checkpoint under its name."""
    from blockllm.zoo import Zoo

    zoo = Zoo(root)
    for name, path in checkpoints.items():
        zoo.import_checkpoint(path, name)
    return root


@functools.lru_cache(maxsize=8)
def _hf_model(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(checkpoint: Path, input_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """HF `generate` (greedy) of the checkpoint: the new token ids, EOS included if reached."""
    model = _hf_model(str(checkpoint))
    ids = torch.tensor([list(input_ids)])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, ids.shape[1] :].tolist()


def hf_tokenize(checkpoint: Path, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)(prompt).input_ids


def perturbed_copy(src: Path, dst: Path, layers: Sequence[int], seed: int = 1) -> Path:
    """A 'fine-tune' of `src`: the given decoder layers perturbed, the rest bit-identical."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in layers:
            for p in model.model.layers[i].parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@contextlib.contextmanager
def cluster(
    zoo: Path, workers: Mapping[str, Sequence[str]], models: Sequence[str], **kw: Any
) -> Iterator[Cluster]:
    """`local_cluster` (broker + workers {name: ["model:start-end", ...]} on 127.0.0.1:0, ready
    for `models`; `kw`: ready_timeout, broker, worker_kw). On exit everything is stopped
    (workers first), and no child process may be left."""
    with local_cluster(zoo, workers, models, **kw) as c:
        started = [psutil.Process(p.pid) for p in c.launcher._children() if p.pid]
        yield c
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left running: {alive}"


class FakeBroker:
    """The test acting as the broker on a real ROUTER socket (a peer, not a mock).

    It never pings: give its workers a heartbeat interval longer than the test's pauses
    (`SLOW_BEAT`) unless the test is about liveness.
    """

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = make_socket(self.ctx, zmq.ROUTER, "tcp://127.0.0.1:0", bind=True)
        self.endpoint = bound_endpoint(self.sock)

    def recv(self, timeout: float = 30.0) -> tuple[bytes, Message, list[torch.Tensor]]:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"nothing from the worker within {timeout} s")
        parts = self.sock.recv_multipart(copy=False)
        msg, tensors = frames.decode(parts[1:])
        return parts[0].bytes, msg, [t.clone() for t in tensors]

    def recv_kind(self, kinds: set[Any], timeout: float = 30.0) -> tuple[bytes, Message, list]:
        """The next message of one of `kinds` (others, e.g. heartbeats, are skipped)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            peer, msg, tensors = self.recv(max(0.01, deadline - time.monotonic()))
            if msg.KIND in kinds:
                return peer, msg, tensors

    def send(self, peer: bytes, msg: Message, tensors: Sequence[torch.Tensor] = ()) -> None:
        self.sock.send_multipart([peer, *frames.encode(msg, tensors)], copy=False)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
