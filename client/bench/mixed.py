"""`blockllm bench mixed`: tokens/s of a multi-family trace on workers that host every family
(`blockllm serve`'s static layout: each worker's KV arena serves several geometries) against
the same trace with one family per worker.

Three tiny families of three KV geometries (llama: 2 KV heads, qwen2: 1, mistral: 4; built
locally, nothing downloaded) and a fine-tune of each: 6 tenants. The trace: `requests`
greedy requests spread round-robin over the tenants, `concurrency` in flight at a time,
`new_tokens` each, the same prompts in both layouts. Each layout gets its own cluster on
`workers` workers (one torch thread each) and one warm-up round first.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAMILIES = {"llama": 2, "qwen2": 1, "mistral": 4}  # family -> KV heads


@dataclass(frozen=True, slots=True)
class MixedBenchConfig:
    workers: int = 2
    requests: int = 48
    concurrency: int = 12
    new_tokens: int = 24
    layers: int = 8
    hidden: int = 256


def build_zoo(root: Path, cfg: MixedBenchConfig, say: Callable[[str], None]) -> list[str]:
    """Three families (and a fine-tune of each) imported into the zoo at root/zoo."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blockllm.zoo import Zoo
    from blockllm.zoo.tiny import build_tiny

    zoo = Zoo(root / "zoo")
    names = []
    for i, (family, kv_heads) in enumerate(FAMILIES.items()):
        say(f"building {family} ({kv_heads} KV heads) and its fine-tune")
        base = build_tiny(
            family, root / family, seed=i, layers=cfg.layers, hidden=cfg.hidden, kv_heads=kv_heads
        )
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # a "fine-tune": two layers perturbed, the rest bit-identical
            for layer in list(model.model.layers)[2:4]:
                for p in layer.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        ft = root / f"{family}-ft"
        model.save_pretrained(ft)
        AutoTokenizer.from_pretrained(base).save_pretrained(ft)
        for name, path in ((family, base), (f"{family}-ft", ft)):
            zoo.import_checkpoint(path, name)
            names.append(name)
    return names


def layouts(zoo_dir: Path, names: list[str], n_workers: int) -> dict[str, dict[str, list[str]]]:
    """{"mixed": serve's static layout, "per_family": each family's chain on one worker}."""
    from blockllm.broker.routing import static_placement
    from blockllm.client.launcher.serve import ComputeWeighted
    from blockllm.zoo import Zoo

    zoo = Zoo(zoo_dir)
    manifests = [ComputeWeighted(zoo.manifest(n)) for n in names]
    mixed = static_placement(manifests, n_workers)
    per_family: list[list[Any]] = [[] for _ in range(n_workers)]
    for i, family in enumerate(FAMILIES):
        members = [m for m in manifests if m.name in (family, f"{family}-ft")]
        per_family[i % n_workers].extend(static_placement(members, 1)[0])

    def named(plan: list[list[Any]]) -> dict[str, list[str]]:
        return {f"w{i}": [f"{m}:{a}-{b}" for m, a, b in st] for i, st in enumerate(plan) if st}

    return {"mixed": named(mixed), "per_family": named(per_family)}


def run_trace(client: Any, names: list[str], cfg: MixedBenchConfig) -> dict[str, float]:
    """The trace through one cluster: tokens/s, requests, errors, wall seconds."""
    jobs = [
        (names[i % len(names)], [(7 * i + k) % 300 + 3 for k in range(8 + i % 9)])
        for i in range(cfg.requests)
    ]
    todo = list(range(len(jobs)))
    lock = threading.Lock()
    tokens = [0]
    errors = [0]

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            model, ids = jobs[i]
            try:
                out = client.generate(model, input_ids=ids, max_new_tokens=cfg.new_tokens)
                with lock:
                    tokens[0] += len(out.token_ids)
            except Exception:
                with lock:
                    errors[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(cfg.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "tokens_per_s": round(tokens[0] / wall, 2),
        "tokens": tokens[0],
        "requests": len(jobs),
        "errors": errors[0],
        "wall_s": round(wall, 2),
    }


def run_mixed_bench(cfg: MixedBenchConfig, say: Callable[[str], None]) -> dict[str, Any]:
    """Both layouts over the same trace; {"mixed": {...}, "per_family": {...}, "meta": {...}}."""
    import os

    from blockllm.client.launcher.local import local_cluster

    doc: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="blockllm-bench-mixed-") as tmp:
        root = Path(tmp)
        names = build_zoo(root, cfg, say)
        for name, workers in layouts(root / "zoo", names, cfg.workers).items():
            say(f"{name}: {workers}")
            cluster = local_cluster(root / "zoo", workers, names, ready_timeout=300)
            with cluster as c, c.client(timeout=600) as client:
                run_trace(client, names, _warmup(cfg))
                load0 = os.getloadavg()[0]
                doc[name] = run_trace(client, names, cfg)
                doc[name]["layout"] = workers
                doc[name]["load_avg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
            say(f"{name}: {doc[name]['tokens_per_s']} tokens/s")
    doc["meta"] = {
        "tenants": names,
        "config": {k: getattr(cfg, k) for k in cfg.__slots__},
        "ratio_mixed_over_per_family": round(
            doc["mixed"]["tokens_per_s"] / max(1e-9, doc["per_family"]["tokens_per_s"]), 3
        ),
    }
    return doc


def _warmup(cfg: MixedBenchConfig) -> MixedBenchConfig:
    return MixedBenchConfig(
        cfg.workers, min(cfg.requests, cfg.concurrency), cfg.concurrency, 4, cfg.layers, cfg.hidden
    )


def report(doc: dict[str, Any]) -> list[str]:
    lines = []
    for name in ("mixed", "per_family"):
        r = doc[name]
        lines.append(
            f"{name:>10}: {r['tokens_per_s']:8.1f} tokens/s  ({r['tokens']} tokens, "
            f"{r['requests']} requests, {r['errors']} errors, {r['wall_s']} s, "
            f"load {r['load_avg_1m']})"
        )
    lines.append(f"mixed / per_family = {doc['meta']['ratio_mixed_over_per_family']}")
    return lines
