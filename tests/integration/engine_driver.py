"""The in-process harness of the stage-engine tests (tests/integration/test_engine_*.py).

Each test drives Workers in-process the way the broker does: a request's hops are (worker,
stage keys) pairs; every tick, hop 0 gets each active request's new tokens, hidden states
travel hop to hop, the last hop samples. Requests join and leave at different ticks with
different prompt lengths, so prefills and decodes of several requests share every step.
Every output is compared with HF's own `generate` (`hf_greedy`).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blockllm.worker.errors import ErrorCode
from blockllm.worker.items import SamplingParams, WorkItem
from blockllm.worker.worker import Worker, WorkerConfig
from blockllm.zoo import Zoo

FAMILIES = ("llama", "mistral", "qwen2")
# (prompt length, join tick, max new tokens) of 8 requests: ragged, staggered, leaving early
PLAN = (
    (5, 0, 12),
    (19, 0, 7),
    (1, 1, 10),
    (33, 2, 9),
    (8, 2, 14),
    (12, 5, 6),
    (3, 6, 9),
    (26, 8, 5),
)

Hop = tuple[Worker, tuple[str, ...]]


@dataclass
class Req:
    rid: str
    prompt: list[int]
    max_new: int
    join: int
    sampling: SamplingParams | None = None
    route: list[Hop] | None = None  # None: the driver's hops
    out: list[int] = field(default_factory=list)
    replays: int = 0

    @property
    def history(self) -> list[int]:
        return self.prompt + self.out


class Driver:
    """A tiny in-process broker: routes hidden states hop to hop, replays on KV_MISS."""

    def __init__(self, hops: list[Hop], eos: frozenset[int] = frozenset()) -> None:
        self.hops, self.eos = hops, eos
        self.reqs: dict[str, Req] = {}
        self.tick = 0
        self.active: set[str] = set()
        self._at: dict[str, tuple[int, int]] = {}  # rid -> (hop, past_len) of its item in flight

    def add(self, *reqs: Req) -> Driver:
        for r in reqs:
            self.reqs[r.rid] = r
        return self

    def route(self, req: Req) -> list[Hop]:
        return req.route or self.hops

    def workers(self) -> list[Worker]:
        routes = [self.hops] + [r.route for r in self.reqs.values() if r.route]
        return list(dict.fromkeys(w for route in routes for w, _k in route))

    def submit(self, hop: int, req: Req, x: torch.Tensor, past: int) -> None:
        worker, keys = self.route(req)[hop]
        is_ids = x.dtype == torch.int64
        item = WorkItem(
            req.rid,
            self.tick,
            keys,
            past,
            tokens=x if is_ids else None,
            hidden=None if is_ids else x,
            max_total_len=len(req.prompt) + req.max_new,
            sampling=req.sampling,
        )
        worker.submit(item)
        self._at[req.rid] = (hop, past)

    def replay(self, req: Req) -> None:
        """What the broker does on KV_MISS: release everywhere, re-prefill the history."""
        for worker in self.workers():
            worker.release(req.rid)
        req.replays += 1
        self.submit(0, req, torch.tensor(req.history), 0)

    def run(self, max_ticks: int = 200, pause_at: int | None = None) -> dict[str, list[int]]:
        """Tick until every request finished (or the tick `pause_at`); returns the generated
        tokens per request."""
        while self.tick < max_ticks:
            if self.tick == pause_at:
                return {rid: r.out for rid, r in self.reqs.items()}
            for r in self.reqs.values():
                if r.join == self.tick:
                    self.active.add(r.rid)
                    self.submit(0, r, torch.tensor(r.prompt), 0)
                elif r.rid in self.active:
                    self.submit(0, r, torch.tensor(r.out[-1:]), len(r.history) - 1)
            self.run_tick()
            self.tick += 1
            if not self.active and all(r.join < self.tick for r in self.reqs.values()):
                break
        assert not self.active, f"unfinished requests: {sorted(self.active)}"
        return {rid: r.out for rid, r in self.reqs.items()}

    def run_tick(self) -> None:
        """Step the workers in hop order until no work is left anywhere."""
        workers = self.workers()
        while any(w.queued() for w in workers):
            for worker in workers:
                if worker.queued():
                    for res in worker.step():
                        self.handle(res)

    def handle(self, res) -> None:
        req = self.reqs[res.request_id]
        hop, past = self._at.pop(req.rid)
        if res.error == ErrorCode.KV_MISS:
            self.replay(req)
            return
        assert res.error is None, (res.error, res.message)
        if res.token_id is None:
            self.submit(hop + 1, req, res.hidden, past)
            return
        req.out.append(res.token_id)
        if len(req.out) >= req.max_new or res.token_id in self.eos:
            self.active.discard(req.rid)
            for worker in self.workers():
                worker.release(req.rid)


def make_reqs(vocab: int, plan=PLAN, seed: int = 0, sampling=None) -> list[Req]:
    g = torch.Generator().manual_seed(seed)
    return [
        Req(f"r{i}", torch.randint(3, vocab, (n,), generator=g).tolist(), new, join, sampling)
        for i, (n, join, new) in enumerate(plan)
    ]


@functools.cache
def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@functools.cache
def hf_greedy(path: str, prompt: tuple[int, ...], max_new: int) -> list[int]:
    """HF's own greedy continuation of one prompt, unbatched, stopping at its EOS."""
    model = _hf_model(path)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def eos_ids(zoo: Zoo, name: str) -> frozenset[int]:
    m = zoo.manifest(name)
    eos = m.generation.get("eos_token_id", m.config.get("eos_token_id"))
    return frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])


def assert_matches_hf(path: Path, reqs: list[Req], outs: dict[str, list[int]]) -> None:
    for r in reqs:
        want = hf_greedy(str(path), tuple(r.prompt), r.max_new)
        assert outs[r.rid] == want, f"{r.rid} (prompt {len(r.prompt)}): {outs[r.rid]} != {want}"


def import_model(tmp_path: Path, ckpt: Path, name: str = "m", zoo: Zoo | None = None) -> Zoo:
    zoo = zoo or Zoo(tmp_path / "zoo")
    zoo.import_checkpoint(ckpt, name)
    return zoo


def cuts_to_hops(zoo: Zoo, name: str, cuts: list[list[int]], **cfg) -> list[Hop]:
    """cuts: per worker, the chain boundaries of its stages, e.g. [[0, 1, 3], [3, 6]]."""
    hops = []
    for bounds in cuts:
        w = Worker(zoo, WorkerConfig(kv_budget_bytes=cfg.get("kv", 1 << 22), **cfg.get("w", {})))
        keys = tuple(w.load_stage(name, a, b).key for a, b in itertools.pairwise(bounds))
        hops.append((w, keys))
    return hops
