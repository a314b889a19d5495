"""The HF transformers systems of `bench multitenant`: what a user without BlockLLM writes.

Both load each tenant with `from_pretrained` from its checkpoint folder under the same weight
budget (least recently used model evicted when the next one does not fit; the load time is on
the clock), in the benchmark's dtype, and decode greedily with `model.generate`. A LoRA
tenant is its base's checkpoint with the PEFT adapter applied and merged at load (HF + PEFT
serving one adapter at a time, the fastest way it decodes).

- `hf_generate` (the naive row): one request at a time, in arrival order.
- `hf_batched` (dynamic batching, the strongest thing a user writes in an afternoon): whenever
  the server is free, the model whose oldest waiting request came first is made resident and
  ALL its waiting requests (up to `max_batch`) go into one `generate` call, left-padded with an
  attention mask. Requests that arrive meanwhile wait for the next call. Each row's first-token
  and finish times are the moments its first and its last token came out of that call (a
  streamer notes every step), so a short answer is not charged for the batch's longest one;
  its tokens are counted up to its own EOS or `max_new_tokens`.

Both pull requests from an `Arrivals` (open loop, or closed loop with `clients`).
"""

from __future__ import annotations

import gc
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockllm.client.bench.arrivals import Arrivals
from blockllm.client.bench.trace import Outcome, TraceRequest

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class HfSpec:
    checkpoints: Mapping[str, Path]  # tenant -> checkpoint folder
    model_bytes: Mapping[str, int]  # tenant -> bytes held whole (for the budget)
    weight_budget_bytes: int
    threads: int | None = None
    dtype: str = "auto"  # torch dtype name of the weights ("auto": the checkpoint's)
    max_batch: int = 32  # hf_batched: rows per generate call
    device: str = "cpu"
    # LoRA tenants: tenant -> PEFT adapter folder, applied with peft on its checkpoint (the
    # base) at load and merged (`merge_and_unload`: HF + PEFT serving one adapter at a time)
    adapters: Mapping[str, Path] = field(default_factory=dict)


class _Steps:
    """A generate() streamer noting when each step's tokens come out (the first call carries
    the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.times: list[float] = []

    def put(self, _value: Any) -> None:
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.monotonic())

    def end(self) -> None:
        pass


class HfModels:
    """from_pretrained models under a weight budget, least recently used evicted first."""

    def __init__(self, spec: HfSpec) -> None:
        self.spec = spec
        self.models: OrderedDict[str, Any] = OrderedDict()
        self.loads = 0
        self.load_seconds = 0.0
        self.peak = 0

    def get(self, name: str) -> Any:
        if name in self.models:
            self.models.move_to_end(name)
            return self.models[name]
        import torch
        from transformers import AutoModelForCausalLM

        need = self.spec.model_bytes[name]
        while self.models and self.nbytes() + need > self.spec.weight_budget_bytes:
            self.models.popitem(last=False)
            gc.collect()
        t = time.monotonic()
        dtype = self.spec.dtype if self.spec.dtype == "auto" else getattr(torch, self.spec.dtype)
        model = AutoModelForCausalLM.from_pretrained(self.spec.checkpoints[name], dtype=dtype)
        adapter = self.spec.adapters.get(name)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        self.models[name] = model.to(self.spec.device).eval()
        self.loads += 1
        self.load_seconds += time.monotonic() - t
        self.peak = max(self.peak, self.nbytes())
        return model

    def nbytes(self) -> int:
        return sum(self.spec.model_bytes[n] for n in self.models)

    def preload(self, by_popularity: Sequence[str]) -> None:
        """Warm start, as per_model gets: the most popular models while they fit (off the
        clock)."""
        for name in by_popularity:
            if self.nbytes() + self.spec.model_bytes[name] <= self.spec.weight_budget_bytes:
                self.get(name)


def _ids(model: Any) -> tuple[int, frozenset[int]]:
    """(pad id, EOS ids) of a model's generation config."""
    gen = model.generation_config
    eos = gen.eos_token_id
    eos_set = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
    pad = gen.pad_token_id if gen.pad_token_id is not None else eos
    if isinstance(pad, list):
        pad = pad[0]
    return int(pad if pad is not None else 0), eos_set


def generate_batch(model: Any, reqs: Sequence[TraceRequest]) -> list[tuple[list[int], list[float]]]:
    """One greedy `generate` over `reqs` (left-padded, attention mask); per row its new token
    ids (cut at its EOS or its max_new_tokens) and the time each came out."""
    import torch

    pad, eos = _ids(model)
    width = max(len(r.prompt_ids) for r in reqs)
    ids = torch.full((len(reqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(reqs), width), dtype=torch.long)
    for i, r in enumerate(reqs):
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[i, width - len(r.prompt_ids) :] = 1
    steps = _Steps()
    with torch.inference_mode():
        out = model.generate(
            ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max(r.max_new_tokens for r in reqs),
            do_sample=False,
            pad_token_id=pad,
            streamer=steps,
        )
    rows = []
    for i, r in enumerate(reqs):
        new = out[i, width:].tolist()[: r.max_new_tokens]
        cut = next((j + 1 for j, t in enumerate(new) if t in eos), len(new))
        rows.append((new[:cut], steps.times[:cut]))
    return rows


def _serve(models: HfModels, batch: Sequence[tuple[TraceRequest, Outcome]], t0: float) -> None:
    """Run one batch of one model's requests, filling in their outcomes."""
    try:
        rows = generate_batch(models.get(batch[0][0].model), [r for r, _ in batch])
    except Exception as e:  # counted, the run goes on
        for _, o in batch:
            o.error = f"{type(e).__name__}: {e}"
        return
    for (_, o), (tokens, times) in zip(batch, rows, strict=True):
        o.tokens = len(tokens)
        if times:
            o.first_token_s, o.finish_s = times[0] - t0, times[-1] - t0
        else:
            o.finish_s = time.monotonic() - t0


def _replay(
    models: HfModels, arrivals: Arrivals, max_batch: int, name: str, say: Say
) -> list[Outcome]:
    """Serve every request of `arrivals`, one generate call at a time (max_batch rows each)."""
    waiting: dict[str, deque[tuple[TraceRequest, Outcome]]] = {}
    t0 = time.monotonic()
    done = 0
    while True:
        for req, o in arrivals.due(time.monotonic() - t0):
            waiting.setdefault(req.model, deque()).append((req, o))
        queued = [(q[0][0].arrival_s, m) for m, q in waiting.items() if q]
        if not queued:
            nxt = arrivals.next_at()
            if nxt is None:
                if arrivals.exhausted():
                    return arrivals.outcomes
                continue  # closed loop: every client was just freed (due() hands them out)
            time.sleep(max(0.0, min(0.05, nxt - (time.monotonic() - t0))))
            continue
        q = waiting[min(queued)[1]]
        batch = [q.popleft() for _ in range(min(max_batch, len(q)))]
        _serve(models, batch, t0)
        for _, o in batch:
            arrivals.finished(o)
        if (done + len(batch)) // 16 > done // 16:
            say(f"{name}: {done + len(batch)}/{len(arrivals.outcomes)} requests done")
        done += len(batch)


def run_hf(
    spec: HfSpec,
    trace: Sequence[TraceRequest],
    by_popularity: Sequence[str],
    say: Say,
    *,
    batched: bool,
    clients: int | None = None,
    on_start: Callable[[], None] | None = None,
) -> tuple[list[Outcome], dict[str, Any]]:
    """hf_batched (`batched`) or hf_generate over the trace; (outcomes, facts)."""
    import torch
    from transformers.utils import logging as hf_logging

    if spec.threads:
        torch.set_num_threads(spec.threads)
    hf_logging.disable_progress_bar()
    models = HfModels(spec)
    models.preload(by_popularity)
    warm = next(reversed(models.models)) if models.models else trace[0].model
    generate_batch(models.get(warm), [trace[0]])  # first-call costs off the clock
    models.loads, models.load_seconds = 0, 0.0
    name = "hf_batched" if batched else "hf_generate"
    if on_start is not None:
        on_start()
    outcomes = _replay(
        models, Arrivals(trace, clients), spec.max_batch if batched else 1, name, say
    )
    facts = {
        "loads": models.loads,
        "load_seconds": round(models.load_seconds, 2),
        "peak_weight_bytes": models.peak,
    }
    return outcomes, facts
