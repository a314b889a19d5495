"""The cost of heterogeneity with LoRA tenants, measured in the engine (one worker, in process).

`python -m blockllm.client.bench.lora [--tenants 32] [--batch 32] [--new-tokens 32] [--quick]`

The same batch of concurrent requests decodes twice on one `Worker` holding the whole chain
as one stage: once every request targets the base model, once each request targets one of
`--tenants` PEFT adapters of it (ranks 8-16, different targets, Zipf popularity, made with peft
and imported with `zoo import`). Reported: decode tokens/s of both and their ratio (the issue's
goal: >= 0.8), and the resident weight bytes (base blocks + adapter blocks). Not the whole
`bench multitenant --family lora` (no per_model / HF+PEFT systems, no broker): see README.
Everything is cached under ~/.cache/blockllm/bench/lora-<kind>/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

TARGET_SETS = (
    ("q_proj", "v_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("gate_proj", "up_proj", "down_proj"),
    ("q_proj", "v_proj", "up_proj", "down_proj"),
)


def _say(msg: str) -> None:
    print(f"[bench lora] {msg}", file=sys.stderr, flush=True)


def prepare(kind: str, tenants: int, cache: Path) -> tuple[Any, list[str]]:
    """The zoo holding the base ("base") and `tenants` adapters ("lora1".."loraN")."""
    import torch

    from blockllm.zoo import Zoo
    from blockllm.zoo.lora import train_lora

    root = cache / f"lora-{kind}"
    if kind == "smollm2":
        from blockllm.zoo.models import convert_smollm2

        base = convert_smollm2(Path.home() / ".cache" / "blockllm" / "smollm2-float32")
    else:
        from blockllm.zoo.tiny import build_tiny

        base = root / "tiny"
        if not (base / "config.json").is_file():
            build_tiny("llama", base, layers=8, hidden=128, dtype=torch.float32)
    zoo = Zoo(root / "zoo")
    if not zoo.has_model("base"):
        zoo.import_checkpoint(base, "base")
    names = []
    for i in range(tenants):
        name = f"lora{i + 1}"
        names.append(name)
        if zoo.has_model(name):
            continue
        folder = root / "adapters" / name
        if not (folder / "adapter_config.json").is_file():
            _say(f"making {name} with peft (cached afterwards)")
            train_lora(
                base,
                folder,
                None,
                rank=8 + i % 9,
                targets=TARGET_SETS[i % 4],
                steps=0,
                seed=i + 1,
                overwrite=True,
            )
        zoo.import_adapter(folder, name, base="base")
    return zoo, names


def zipf_choice(names: list[str], n: int, seed: int, s: float = 1.1) -> list[str]:
    weights = [1 / (k + 1) ** s for k in range(len(names))]
    return random.Random(seed).choices(names, weights, k=n)


def decode_rate(
    w: Any, keys: tuple[str, ...], zoo: Any, models: list[str], prompt: int, new: int, tag: str
) -> tuple[float, float]:
    """Prefill every request, then time `new` batched decode steps: tokens/s of the decode, by
    the wall clock and by this process's CPU time (steadier on a loaded machine)."""
    import torch

    from blockllm.worker.worker import WorkItem

    toks = {}
    for i, m in enumerate(models):
        rid = f"{tag}{i}"
        ids = [(7 * i + 3 * k) % 1000 + 10 for k in range(prompt)]
        w.submit(
            WorkItem(
                rid,
                0,
                keys,
                0,
                tokens=torch.tensor(ids),
                max_total_len=prompt + new + 1,
                adapters=zoo.manifest(m).adapter_blocks,
            )
        )
        toks[rid] = ids
    pending = set(toks)
    while pending:
        for r in w.step():
            assert r.error is None, r.message
            toks[r.request_id].append(r.token_id)
            pending.discard(r.request_id)
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(1, new + 1):
        for i, m in enumerate(models):
            rid = f"{tag}{i}"
            w.submit(
                WorkItem(
                    rid,
                    step,
                    keys,
                    len(toks[rid]) - 1,
                    tokens=torch.tensor(toks[rid][-1:]),
                    adapters=zoo.manifest(m).adapter_blocks,
                )
            )
        results = w.step()
        assert len(results) == len(models) and all(r.error is None for r in results)
        for r in results:
            toks[r.request_id].append(r.token_id)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    for rid in toks:
        w.release(rid)
    return len(models) * new / seconds, len(models) * new / cpu


def _pss() -> int:
    import psutil

    return int(psutil.Process().memory_full_info().pss)


def _raw_adapter_bytes(zoo: Any, models: list[str]) -> int:
    """The adapters' own bytes (their blocks in the zoo), each adapter once."""
    blocks = {b for m in set(models) for _, b in zoo.manifest(m).adapter_blocks}
    return sum(zoo.block_nbytes(b) for b in blocks)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from blockllm.worker.worker import Worker, WorkerConfig, stage_key

    kind = "tiny" if args.quick else "smollm2"
    zoo, names = prepare(kind, args.tenants, Path(args.cache))
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    w = Worker(zoo, WorkerConfig(kv_budget_bytes=args.kv_mib << 20, max_batch_size=args.batch))
    m = zoo.manifest("base")
    w.load_stage("base", 0, len(m.chain))
    keys = (stage_key(m, 0, len(m.chain)),)
    mixed = zipf_choice(names, args.batch, args.seed)
    base_only = ["base"] * args.batch
    rates: dict[str, list[float]] = {"base": [], "lora": []}
    cpu: dict[str, list[float]] = {"base": [], "lora": []}
    with torch.inference_mode():
        decode_rate(w, keys, zoo, base_only, 8, 2, "warm-base")  # allocator warm
        pss_base = _pss()
        decode_rate(w, keys, zoo, mixed, 8, 2, "warm")  # adapters read and placed
        for r in range(args.repeats):  # alternating, so both see the same load
            for mode, models in (("base", base_only), ("lora", mixed)):
                wall, on_cpu = decode_rate(
                    w, keys, zoo, models, args.prompt, args.new_tokens, f"{mode}{r}-"
                )
                rates[mode].append(wall)
                cpu[mode].append(on_cpu)
    best = {k: max(v) for k, v in rates.items()}
    best_cpu = {k: max(v) for k, v in cpu.items()}
    return {
        "family": kind,
        "tenants": args.tenants,
        "distinct_adapters_in_batch": len(set(mixed)),
        "batch": args.batch,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new_tokens,
        "threads": threads,
        "base_tok_s": round(best["base"], 1),
        "lora_tok_s": round(best["lora"], 1),
        "ratio": round(best["lora"] / best["base"], 3),
        "runs": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "cpu_base_tok_s": round(best_cpu["base"], 1),
        "cpu_lora_tok_s": round(best_cpu["lora"], 1),
        "cpu_ratio": round(best_cpu["lora"] / best_cpu["base"], 3),
        "base_weight_bytes": w.blocks.total_bytes,
        "adapter_bytes": w.adapter_bytes,  # every byte held for adapters (pools, plans)
        "adapter_raw_bytes": _raw_adapter_bytes(zoo, mixed),
        "adapter_plan_bytes": sum(w.stage_model(k).lora.plan_bytes for k in keys),
        "adapter_blocks_resident": len(w.adapters.resident()),
        "pss_base_bytes": pss_base,  # this process after base-only decodes
        "pss_bytes": _pss(),  # ... and after the adapters' runs too
        "memory_ratio": round(
            _pss() / (pss_base + _raw_adapter_bytes(zoo, mixed)), 3
        ),  # measured vs base + adapters' bytes (goal <= 1.1)
        "load_average": os.getloadavg(),
        "goal_ratio": 0.8,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m blockllm.client.bench.lora",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tenants", type=int, default=32, help="adapters of the base (Zipf)")
    p.add_argument("--batch", type=int, default=32, help="concurrent requests decoding")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=32, help="timed decode steps")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs; the best is kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads [all cores]")
    p.add_argument("--kv-mib", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny random Llama instead of SmolLM2")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "blockllm" / "bench"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    doc = run(args)
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(
        f"{doc['tenants']} LoRA tenants of {doc['family']} ({doc['distinct_adapters_in_batch']} "
        f"distinct in a batch of {doc['batch']}), {doc['new_tokens']} decode steps, "
        f"{doc['threads']} threads, load {doc['load_average'][0]:.2f}\n"
        f"  all base:      {doc['base_tok_s']:8.1f} tok/s\n"
        f"  mixed LoRA:    {doc['lora_tok_s']:8.1f} tok/s  "
        f"(ratio {doc['ratio']:.3f}, goal >= 0.8)\n"
        f"  by CPU time:   {doc['cpu_base_tok_s']:8.1f} / {doc['cpu_lora_tok_s']:.1f} tok/s "
        f"(ratio {doc['cpu_ratio']:.3f})\n"
        f"  weights: base {doc['base_weight_bytes'] / 2**20:.1f} MiB + adapters "
        f"{doc['adapter_bytes'] / 2**20:.1f} MiB held ({doc['adapter_raw_bytes'] / 2**20:.1f} "
        f"MiB as stored, {doc['adapter_blocks_resident']} blocks)\n"
        f"  measured PSS: base only {doc['pss_base_bytes'] / 2**20:.1f} MiB, with the "
        f"adapters {doc['pss_bytes'] / 2**20:.1f} MiB (ratio to base + adapters "
        f"{doc['memory_ratio']:.3f}, goal <= 1.1)"
    )


if __name__ == "__main__":
    main()
