"""`blockllm bench multitenant --family full`: where exact dedup saves nothing, what does
sharing within an equivalence tolerance save, and what does it cost in quality?

Variants fine-tune every tensor of the base a few steps (`finetune(..., full=True)`), so no
block is byte-identical to the base's. For each variant and decoder layer, the zoo's own
equivalence measurement (`zoo.equiv.Measurer`, stored like `blockllm zoo equiv` stores it)
scores serving the base's block in place of the variant's. For each tolerance, every variant's
chain is assembled exactly as the planner assembles it (`broker.assembly.assemble`: by
ascending KL while the summed KL stays within the tolerance; the embedding and head are never
substituted), and we report
- `resident_bytes`: the distinct blocks of all tenants' chains (what the workers would hold),
  and `saved_bytes` against exact serving (tolerance 0);
- `agreement`: the fraction of held-out positions where the assembled variant's greedy next
  token equals exact serving's (teacher-forced, averaged over variants);
- `perplexity`: of the assembled variants on held-out text (Python docstrings of modules the
  fine-tunes and the calibration never saw), exp of the mean token NLL over all variants.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from blockllm.client.bench.family import Family, FamilySpec, Recipe, prepare_family

logger = logging.getLogger(__name__)

Say = Callable[[str], None]
TOLERANCES = (0.0, 1e-5, 3e-5, 1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
# modules whose docstrings neither the fine-tunes (zoo.tiny.local_corpus) nor calibration use
HELDOUT_MODULES = (
    "zipfile",
    "tarfile",
    "decimal",
    "fractions",
    "statistics",
    "difflib",
    "calendar",
    "shutil",
    "tempfile",
    "queue",
    "sched",
    "shlex",
)


@dataclass(frozen=True, slots=True)
class FullConfig:
    quick: bool = False
    variants: int = 3
    cache_dir: Path | None = None
    tolerances: tuple[float, ...] = TOLERANCES
    calibration_prompts: int = 8
    calibration_len: int = 32
    heldout_windows: int = 8
    heldout_len: int = 64


def heldout_ids(checkpoint: Path, windows: int, length: int) -> Any:
    """LongTensor [windows, length] of held-out text through the family's tokenizer."""
    import importlib

    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    ids: list[int] = []
    for name in HELDOUT_MODULES:
        mod = importlib.import_module(name)
        for obj in [mod, *vars(mod).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40:
                ids.extend(tok(doc.strip(), add_special_tokens=False).input_ids)
        if len(ids) >= windows * length:
            break
    if len(ids) < windows * length:
        raise ValueError(f"held-out text too short: {len(ids)} tokens")
    return torch.tensor(ids[: windows * length], dtype=torch.long).view(windows, length)


def measure_pairs(zoo: Any, family: Family, cfg: FullConfig, say: Say) -> int:
    """Score base-block-for-variant-block at every decoder layer of every variant (stored in
    the zoo; pairs already stored are not measured again). Returns how many were measured."""
    from blockllm.zoo.equiv import Measurer
    from blockllm.zoo.equiv_store import EquivalenceStore

    store = EquivalenceStore(zoo)
    base = zoo.manifest(family.base.name)
    measurer = Measurer(zoo, cfg.calibration_prompts, cfg.calibration_len)
    done = 0
    for t in family.tenants[1:]:
        m = zoo.manifest(t.name)
        todo = [
            p
            for p in range(1, len(m.chain) - 1)
            if m.chain[p] != base.chain[p] and store.get(m.chain[p], base.chain[p]) is None
        ]
        if todo:
            say(f"measuring {len(todo)} equivalences of {t.name} (base layer for its layer)")
        for p in todo:
            store.put(measurer.measure(t.name, p, base.chain[p]))
            done += 1
    return done


def assembled_chains(zoo: Any, names: Sequence[str], tolerance: float) -> dict[str, tuple]:
    """Each tenant's chain under `tolerance`, by the planner's own assembly rule."""
    from blockllm.broker.planner.assembly import assemble

    manifests = {n: zoo.manifest(n) for n in names}
    shim = SimpleNamespace(
        manifests=manifests,
        equivalences=zoo.equivalences(),
        cfg=SimpleNamespace(tolerance=tuple((n, tolerance) for n in names)),
    )
    return {n: assemble(shim, n) for n in names}  # type: ignore[arg-type]


def _quality(zoo: Any, name: str, chains: dict[float, tuple], ids: Any) -> dict[float, tuple]:
    """{tolerance: (agreeing tokens, nll sum, tokens)} of variant `name` under each chain."""
    import torch

    from blockllm.zoo.hfmodel import build_hf_model, substituted

    m = zoo.manifest(name)
    model = build_hf_model(zoo, m)
    with torch.inference_mode():
        exact = model(input_ids=ids).logits.float()
    greedy = exact.argmax(-1)
    out: dict[float, tuple] = {}
    seen: dict[tuple, tuple] = {}
    for tol, chain in chains.items():
        if chain not in seen:
            with contextlib.ExitStack() as stack, torch.inference_mode():
                for p, bid in enumerate(chain):
                    if bid != m.chain[p]:
                        stack.enter_context(substituted(model, m, p, zoo.load_block(bid)))
                logits = model(input_ids=ids).logits.float() if chain != m.chain else exact
            agree = int((logits.argmax(-1) == greedy).sum())
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None]).sum().item()
            seen[chain] = (agree, nll, ids[:, 1:].numel(), greedy.numel())
        out[tol] = seen[chain]
    del model
    return out


def _substituted(zoo: Any, chains: dict[str, tuple]) -> int:
    """Chain positions, over all tenants, served by another model's block."""
    own = {n: zoo.manifest(n).chain for n in chains}
    return sum(sum(a != b for a, b in zip(c, own[n], strict=True)) for n, c in chains.items())


def _resident(zoo: Any, chains: dict[str, tuple]) -> int:
    blocks = {b for chain in chains.values() for b in chain}
    return sum(zoo.block_nbytes(b) for b in blocks)


def _quality_totals(
    zoo: Any, variants: Sequence[str], per_tol: dict[float, dict], ids: Any, say: Say
) -> dict[float, list]:
    """Per tolerance: [agreeing tokens, NLL sum, NLL tokens, tokens] over all variants."""
    totals: dict[float, list] = {tol: [0, 0.0, 0, 0] for tol in per_tol}
    for name in variants:
        say(f"quality of {name} at {len(per_tol)} tolerances")
        q = _quality(zoo, name, {tol: chains[name] for tol, chains in per_tol.items()}, ids)
        for tol, values in q.items():
            totals[tol] = [a + b for a, b in zip(totals[tol], values, strict=True)]
    return totals


def _point(
    zoo: Any, tol: float, chains: dict[str, tuple], totals: list, exact_bytes: int
) -> dict[str, Any]:
    """One point of the curve."""
    agree, nll, n_nll, n_tok = totals
    resident = _resident(zoo, chains)
    return {
        "tolerance": tol,
        "resident_bytes": resident,
        "saved_bytes": exact_bytes - resident,
        "substituted_layers": _substituted(zoo, chains),
        "agreement": round(agree / n_tok, 4) if n_tok else None,
        "perplexity": round(math.exp(nll / n_nll), 3) if n_nll else None,
    }


def run_full_family(cfg: FullConfig, say: Say) -> dict[str, Any]:
    """Prepare (or reuse) the full fine-tunes, measure, and return the curve document."""
    from blockllm.zoo import Zoo

    t0 = time.monotonic()
    spec = FamilySpec(
        kind="tiny" if cfg.quick else "smollm2",
        mode="full",
        variants=cfg.variants,
        cache_dir=cfg.cache_dir,
        recipe=Recipe(steps=4, seq_len=32, batch_size=2, lr=1e-4),
    )
    family = prepare_family(spec, say)
    zoo = Zoo(family.zoo_dir)
    names = family.names
    measured = measure_pairs(zoo, family, cfg, say)
    per_tol = {tol: assembled_chains(zoo, names, tol) for tol in cfg.tolerances}
    ids = heldout_ids(family.base.checkpoint, cfg.heldout_windows, cfg.heldout_len)
    totals = _quality_totals(zoo, names[1:], per_tol, ids, say)
    exact_bytes = _resident(zoo, per_tol[cfg.tolerances[0]])
    curve = [_point(zoo, tol, per_tol[tol], totals[tol], exact_bytes) for tol in cfg.tolerances]
    whole = sum(_resident(zoo, {n: zoo.manifest(n).chain}) for n in names)
    return {
        "family": "full",
        "base": family.base.name,
        "tenants": list(names),
        "curve": curve,
        "meta": {
            "kind": family.kind,
            "all_whole_bytes": whole,
            "exact_dedup_saved_bytes": whole - exact_bytes,
            "equivalences_measured": measured,
            "calibration": [cfg.calibration_prompts, cfg.calibration_len],
            "heldout": [cfg.heldout_windows, cfg.heldout_len, list(HELDOUT_MODULES)],
            "agreement": "teacher-forced greedy next token vs exact serving, held-out text",
            "assembly": "broker.assembly.assemble: summed KL of substitutions <= tolerance",
            "seconds": round(time.monotonic() - t0, 1),
        },
    }


def curve_table(doc: dict[str, Any]) -> list[str]:
    meta = doc["meta"]
    lines = [
        f"full fine-tunes of {doc['base']} ({len(doc['tenants']) - 1} variants, every tensor "
        f"changed): exact dedup saves {meta['exact_dedup_saved_bytes'] / 2**20:.1f} MiB of "
        f"{meta['all_whole_bytes'] / 2**20:.1f} MiB",
        f"{'tolerance':>9} {'resident MiB':>12} {'saved MiB':>9} {'layers':>6} "
        f"{'agreement':>9} {'perplexity':>10}",
    ]
    for r in doc["curve"]:
        lines.append(
            f"{r['tolerance']:>9g} {r['resident_bytes'] / 2**20:>12.1f} "
            f"{r['saved_bytes'] / 2**20:>9.1f} {r['substituted_layers']:>6} "
            f"{r['agreement']:>9.4f} {r['perplexity']:>10.3f}"
        )
    return lines


def plot_curve(doc: dict[str, Any], path: Path) -> None:
    """Saved MiB vs agreement/perplexity per tolerance, to a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["saved_bytes"] / 2**20 for r in doc["curve"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [r["agreement"] for r in doc["curve"]], "o-", label="greedy agreement")
    ax.set_xlabel("resident memory saved (MiB)")
    ax.set_ylabel("agreement with exact serving")
    ax2 = ax.twinx()
    ax2.plot(
        xs, [r["perplexity"] for r in doc["curve"]], "s--", color="tab:red", label="perplexity"
    )
    ax2.set_ylabel("held-out perplexity")
    for r, x in zip(doc["curve"], xs, strict=True):
        ax.annotate(f"{r['tolerance']:g}", (x, r["agreement"]), fontsize=7)
    ax.set_title(f"full fine-tunes of {doc['base']}: tolerance vs quality")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
