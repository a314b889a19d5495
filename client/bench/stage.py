"""Decode throughput of the stage engine against HF's own monolithic forward (`bench stage`).

Both engines decode the same ragged batch of prompts greedily on the same checkpoint, in the
same process: ours as one full-chain stage of a `Worker` (paged KV, ragged batch, no padding),
HF as `AutoModelForCausalLM` with a `DynamicCache` over a left-padded batch. Timed decode
steps alternate between the two, so background load on the machine hits both alike; each is
rated by its median step time (tokens/s = batch / median step); ratio = ours / HF.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blockllm.worker.items import WorkerConfig, WorkItem
from blockllm.worker.worker import Worker

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class StageBenchConfig:
    """What `bench stage` measures: a checkpoint folder, batch sizes, timed decode steps."""

    model_dir: Path
    batches: tuple[int, ...] = (1, 8, 32)
    steps: int = 16  # timed decode steps per engine and batch size
    dtype: str = "float32"
    threads: int | None = None  # torch.set_num_threads; None = torch's default
    warmup: int = 2
    prompt_lens: tuple[int, int] = (16, 128)  # ragged prompt lengths drawn from [lo, hi]
    seed: int = 0


def _prompts(cfg: StageBenchConfig, batch: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed + batch)
    lo, hi = cfg.prompt_lens
    lens = torch.randint(lo, hi + 1, (batch,), generator=g).tolist()
    return [torch.randint(10, vocab, (n,), generator=g) for n in lens]


class _Ours:
    """Greedy decoding of a batch through one full-chain stage of a Worker."""

    def __init__(self, worker: Worker, key: str, prompts: list[torch.Tensor], total: int):
        self.worker, self.key = worker, key
        self.past: dict[str, int] = {}
        self.last: dict[str, int] = {}
        for i, p in enumerate(prompts):
            item = WorkItem(f"b{i}", 0, (key,), 0, tokens=p, max_total_len=total)
            self.worker.submit(item)
            self.past[item.request_id] = len(p)
        self._collect()

    def _collect(self) -> None:
        for r in self.worker.step():
            if r.error is not None:
                raise RuntimeError(f"bench request {r.request_id} failed: {r.error} {r.message}")
            self.last[r.request_id] = int(r.token_id)  # type: ignore[arg-type]

    def step(self) -> None:
        for rid, tok in self.last.items():
            self.worker.submit(
                WorkItem(rid, 0, (self.key,), self.past[rid], tokens=torch.tensor([tok]))
            )
            self.past[rid] += 1
        self._collect()

    def close(self) -> None:
        for rid in self.past:
            self.worker.release(rid)


class _HF:
    """Greedy decoding of the same batch with HF's model, DynamicCache and left padding."""

    def __init__(self, model: Any, prompts: list[torch.Tensor]) -> None:
        from transformers import DynamicCache

        self.model = model
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        self.mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at the last column
            ids[i, width - len(p) :] = p
            self.mask[i, width - len(p) :] = 1
        self.cache = DynamicCache(config=model.config)
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0)  # [B, W] positions ignoring the padding
        out = model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=pos,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]

    def step(self) -> None:
        ones = torch.ones(self.mask.shape[0], 1, dtype=torch.long)
        self.mask = torch.cat([self.mask, ones], dim=1)  # [B, W] -> [B, W + 1]
        pos = self.mask.sum(-1, keepdim=True) - 1  # [B, 1]
        out = self.model(
            input_ids=self.next,
            attention_mask=self.mask,
            position_ids=pos,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)


def _step_time(run: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def bench_batch(
    cfg: StageBenchConfig, worker: Worker, key: str, hf: Any, batch: int
) -> dict[str, Any]:
    """One batch size: prefill both engines, warm up, then time decode steps alternately
    (one step each, the order flipped every step) and rate each engine by its median step:
    load spikes from other processes hit single steps, not the median."""
    vocab = int(hf.config.vocab_size)
    prompts = _prompts(cfg, batch, vocab)
    total = max(len(p) for p in prompts) + cfg.warmup + cfg.steps + 1
    ours, theirs = _Ours(worker, key, prompts, total), _HF(hf, prompts)
    for _ in range(cfg.warmup):
        ours.step()
        theirs.step()
    t_ours: list[float] = []
    t_hf: list[float] = []
    for i in range(cfg.steps):
        if i % 2:
            t_hf.append(_step_time(theirs.step))
            t_ours.append(_step_time(ours.step))
        else:
            t_ours.append(_step_time(ours.step))
            t_hf.append(_step_time(theirs.step))
    ours.close()
    med_ours, med_hf = statistics.median(t_ours), statistics.median(t_hf)
    return {
        "batch": batch,
        "blockllm_tok_s": round(batch / med_ours, 2),
        "hf_tok_s": round(batch / med_hf, 2),
        "ratio": round(med_hf / med_ours, 3),
        "blockllm_ms_per_step": round(1000 * med_ours, 2),
        "hf_ms_per_step": round(1000 * med_hf, 2),
        "prompt_lens": [len(p) for p in prompts],
    }


def _kv_budget(cfg: StageBenchConfig, manifest: Any, worker_page: int) -> int:
    c = manifest.config
    heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    itemsize = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    tokens = cfg.prompt_lens[1] + cfg.warmup + cfg.steps + worker_page + 1
    pages = -(-tokens // worker_page) * c["num_hidden_layers"] * max(cfg.batches)
    return pages * 2 * worker_page * heads * head_dim * itemsize


def run_stage_bench(cfg: StageBenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Measure every batch size of `cfg`; returns the `bench stage --json` document."""
    from transformers import AutoModelForCausalLM

    from blockllm.zoo import Zoo

    note = progress or (lambda _msg: None)
    load_before = os.getloadavg()[0]
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    results = []
    with tempfile.TemporaryDirectory(prefix="blockllm-bench-") as tmp, torch.inference_mode():
        note(f"importing {cfg.model_dir} into a temporary zoo")
        zoo = Zoo(tmp)
        manifest = zoo.import_checkpoint(cfg.model_dir, "bench")
        if manifest.dtype != cfg.dtype:
            raise ValueError(f"{cfg.model_dir} holds {manifest.dtype} weights, not {cfg.dtype}")
        wcfg = WorkerConfig(kv_budget_bytes=_kv_budget(cfg, manifest, 16), threads=cfg.threads)
        worker = Worker(zoo, wcfg)
        key = worker.load_stage("bench", 0, len(manifest.chain)).key
        hf = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=dtype).eval()
        for batch in cfg.batches:
            note(f"batch {batch}: {cfg.warmup} warm-up + {cfg.steps} timed decode steps each")
            row = bench_batch(cfg, worker, key, hf, batch)
            note(
                f"batch {batch}: blockllm {row['blockllm_tok_s']:.1f} tok/s,"
                f" hf {row['hf_tok_s']:.1f} tok/s, ratio {row['ratio']:.2f}"
            )
            results.append(row)
    return {
        "bench": "stage",
        "model": cfg.model_dir.name,
        "dtype": cfg.dtype,
        "threads": torch.get_num_threads(),
        "steps": cfg.steps,
        # other processes on the machine skew timings (OpenMP threads spin-wait for a core):
        # the 1-minute load average before and after tells whether a run was quiet
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "results": results,
    }
