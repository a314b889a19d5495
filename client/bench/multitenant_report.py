"""What `blockllm bench multitenant` prints: the table of one run, blockllm per planner mode,
the table of a rate sweep, and the latency CDF plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blockllm.client.bench.multitenant import SYSTEMS
from blockllm.client.bench.trace import Outcome


def table(doc: dict[str, Any]) -> list[str]:
    """The readable table of a result document, one line per row."""
    head = (
        f"{'system':<13} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'ttft p95':>9} "
        f"{'tok/s':>7} {'acct MiB':>9} {'PSS peak':>9} {'PSS mean':>9} {'requests':>8} "
        f"{'errors':>6} {'others':>6}"
    )
    lines = [head, "-" * len(head)]
    facts = doc.get("meta", {}).get("systems", {})
    for name in ("blockllm", "blockllm_base_only", *SYSTEMS[1:]):
        s = doc.get(name)
        if not s:
            continue
        label = "  all on base" if name == "blockllm_base_only" else name  # --family lora
        lines.append(
            f"{label:<13} {_num(s['p50_ms']):>9} {_num(s['p95_ms']):>9} {_num(s['p99_ms']):>9} "
            f"{_num(s['ttft_p95_ms']):>9} {s['tokens_per_s']:>7.1f} "
            f"{s['resident_bytes'] / 2**20:>9.1f} {_mib(s.get('pss_peak_bytes')):>9} "
            f"{_mib(s.get('pss_mean_bytes')):>9} {s['requests']:>8} {s['errors']:>6} "
            f"{_num(facts.get(name, {}).get('other_processes_cores'), '.1f'):>6}"
        )
    pm = doc.get("per_model")
    if pm:
        lines.append(
            f"(per_model with every tenant whole: {pm['resident_bytes_unshared'] / 2**20:.1f} MiB)"
        )
    lines.append(
        "(acct: weights + KV pools the system accounts for; PSS: measured, summed over the "
        "system's processes while it served, in MiB; others: cores that other processes on "
        "this machine kept busy meanwhile)"
    )
    lines += planner_table(doc)
    for name, g in doc.get("meta", {}).get("goals", {}).items():
        lines.append(
            f"goal {name}: {g['value']} (goal {g['goal']}): {'met' if g['met'] else 'NOT met'}"
        )
    return lines


def planner_table(doc: dict[str, Any]) -> list[str]:
    """blockllm per planner mode (what each mechanism buys), when more than static ran."""
    modes = doc.get("meta", {}).get("planner_modes") or {}
    if list(modes) in ([], ["off"]):
        return []
    delay = doc.get("meta", {}).get("straggler_delay_s") or 0
    head = (
        f"{'planner':<12} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'ttft p95':>9} "
        f"{'tok/s':>7} {'resident MiB':>12} {'errors':>6} {'commands':>8} {'moved':>5} "
        f"{'replays':>7} {'load1':>5}"
    )
    slowed = f" (last worker slowed by {delay:g} s per step)" if delay else ""
    lines = ["", f"blockllm by planner mode{slowed}:", head, "-" * len(head)]
    for mode, s in modes.items():
        c = s.get("counters", {})
        lines.append(
            f"{mode:<12} {_num(s['p50_ms']):>9} {_num(s['p95_ms']):>9} {_num(s['p99_ms']):>9} "
            f"{_num(s['ttft_p95_ms']):>9} {s['tokens_per_s']:>7.1f} "
            f"{s['resident_bytes'] / 2**20:>12.1f} {s['errors']:>6} {c.get('commands', 0):>8} "
            f"{c.get('moved', 0):>5} {c.get('replays', 0):>7} "
            f"{_num(s.get('load_average', [None])[0], '.2f'):>5}"
        )
    return lines


def _num(x: float | None, fmt: str = ".0f") -> str:
    return "-" if x is None else format(x, fmt)


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def sweep_table(doc: dict[str, Any]) -> list[str]:
    """One line per (rate, system) of a `--rate A,B,...` sweep, then the p95 goal per rate."""
    head = (
        f"{'rate/s':>6} {'system':<13} {'p50 ms':>9} {'p95 ms':>9} {'ttft p95':>9} "
        f"{'tok/s':>7} {'PSS peak':>9} {'errors':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in doc.get("rates", []):
        for name in SYSTEMS:
            s = r.get(name)
            if not s:
                continue
            lines.append(
                f"{r['rate_rps']:>6g} {name:<13} {_num(s['p50_ms']):>9} {_num(s['p95_ms']):>9} "
                f"{_num(s['ttft_p95_ms']):>9} {s['tokens_per_s']:>7.1f} "
                f"{_mib(s.get('pss_peak_bytes')):>9} {s['errors']:>6}"
            )
    for r in doc.get("rates", []):
        g = r.get("goals", {}).get("p95_reduction_vs_per_model")
        if g:
            verdict = "met" if g["met"] else "NOT met"
            lines.append(
                f"rate {r['rate_rps']:g}/s: blockllm p95 {g['value']:.1%} below per_model "
                f"(goal {g['goal']:.0%}): {verdict}"
            )
    return lines


def plot_cdf(outcomes: dict[str, list[Outcome]], path: Path, title: str) -> None:
    """Latency CDF of each system to a PNG. Raises ImportError when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from blockllm.client.bench.trace import latencies_ms

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, outs in outcomes.items():
        xs = latencies_ms(outs)
        if xs:
            ys = [(i + 1) / len(outs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("request latency (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
