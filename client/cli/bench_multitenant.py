"""`blockllm bench multitenant`: BlockLLM against per-model serving and HF `generate` on one
trace of many fine-tuned tenants at one memory budget (see `client/bench/multitenant.py`), and
with `--family full` the memory-vs-quality curve of equivalence tolerances for full fine-tunes
(see `client/bench/full.py`). Progress on stderr; the table or `--json` on stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from blockllm.client.cli.common import CliError, echo_json, json_option


def _say(text: str) -> None:
    click.echo(f"[bench] {text}", err=True)


def _size(ctx: Any, param: Any, value: str | None) -> int | None:
    if value is None:
        return None
    from blockllm.broker.cluster_config import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(f"{value!r}: {e}") from None


def _rates(ctx: Any, param: Any, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        rates = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: comma-separated numbers, e.g. 1,1.5,2") from None
    if not rates or min(rates) <= 0:
        raise click.BadParameter(f"{value!r}: rates must be > 0")
    return rates


def _planner_modes(ctx: Any, param: Any, value: str) -> tuple[str, ...]:
    from blockllm.client.bench.systems import PLANNER_MODES

    modes = tuple(m.strip() for m in value.split(",") if m.strip())
    bad = [m for m in modes if m not in PLANNER_MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        raise click.BadParameter(f"{value!r}: distinct modes of {', '.join(PLANNER_MODES)}")
    return modes


@click.command("multitenant")
@click.option(
    "--quick",
    is_flag=True,
    help="A tiny random Llama family instead of SmolLM2 (a run of about a minute).",
)
@click.option(
    "--family",
    "family_mode",
    type=click.Choice(["partial", "full", "lora"]),
    default="partial",
    show_default=True,
    help="partial: variants fine-tune slices of the upper layers (the three systems); "
    "full: every layer fine-tuned, memory saved vs quality per equivalence tolerance; "
    "lora: variants are PEFT adapters (ranks 8-16) that blockllm serves as adapters on the "
    "base, the baselines as whole models with the adapter merged at load (needs peft), "
    "plus --full-tenants full fine-tunes.",
)
@click.option(
    "--full-tenants",
    "full_variants",
    type=click.IntRange(0, 8),
    default=3,
    show_default=True,
    help="--family lora: full fine-tunes of the base among the tenants too.",
)
@click.option(
    "--tenants",
    "variants",
    type=click.IntRange(1, 32),
    default=None,
    help="Fine-tuned variants besides the base [default: 6; --family full: 3].",
)
@click.option(
    "--requests",
    type=click.IntRange(1),
    default=None,
    help="Requests in the trace [default: 64].",
)
@click.option(
    "--rate",
    "rates",
    default=None,
    callback=_rates,
    metavar="RATES",
    help="Mean arrivals per second (Poisson) [default: 2.0; --quick: 16]; several "
    "(1,1.5,2,2.5,3) run one open-loop trace each, printed as one table.",
)
@click.option(
    "--saturate",
    type=click.IntRange(1, 256),
    default=None,
    metavar="CLIENTS",
    help="Closed loop instead of arrivals: CLIENTS clients, each sending its next request "
    "when its last one finished; tok/s is then each system's capacity.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Weights and activations of every tenant, hence of every system.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the trace (tenants by Zipf popularity, lengths).",
)
@click.option(
    "--budget",
    "budget",
    default=None,
    callback=_size,
    metavar="BYTES",
    help="Memory budget of every system (bytes or 2GiB) [default: the shared zoo's "
    "blocks + the KV reserve, or what the blockllm cluster holds if more].",
)
@click.option(
    "--workers",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Worker processes of the blockllm cluster.",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=None,
    help="torch threads per worker [default: the cores split across the workers].",
)
@click.option(
    "--planner",
    default="off",
    show_default=True,
    callback=_planner_modes,
    metavar="MODES",
    help="blockllm's planner, one run per mode (comma-separated): off (static placement), "
    "placement (the planner places by demand), dups (placement + straggler duplicates).",
)
@click.option(
    "--straggler-delay",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="Seconds added to every step of blockllm's last worker (a straggler for dups).",
)
@click.option(
    "--baseline-threads",
    type=click.IntRange(1),
    default=None,
    help="torch threads of per_model and hf_generate [default: the faster of 1 and "
    "all cores, measured first].",
)
@click.option(
    "--systems",
    default="blockllm,per_model,per_model_all,hf_generate,hf_batched",
    show_default=True,
    help="Which systems to run (comma-separated).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Tenants and zoo cache [default: ~/.cache/blockllm/bench].",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a latency-CDF PNG (needs matplotlib: pip install 'blockllm[plot]').",
)
@json_option
def multitenant(**p: Any) -> None:
    """Serve K fine-tuned tenants five ways on one trace at one memory budget: blockllm
    (shared blocks, batched across tenants), per_model (each tenant whole, LRU under the
    budget), per_model_all (every tenant whole at once), hf_generate (transformers, one
    request at a time) and hf_batched (transformers, each model's waiting requests padded into
    one generate call). Prints p50/p95/p99 latency, TTFT p95, tokens/s, accounted memory and
    the measured PSS (peak, mean) of each."""
    if p["plot"] is not None:
        _require_matplotlib()
    if p["family_mode"] == "full":
        _run_full(p)
        return
    from blockllm.client.bench.multitenant import SYSTEMS, MultitenantConfig, run_multitenant
    from blockllm.client.bench.multitenant_report import plot_cdf, table

    systems = tuple(s.strip() for s in p["systems"].split(",") if s.strip())
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise click.BadParameter(
            f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}", param_hint="--systems"
        )
    cfg = MultitenantConfig(
        quick=p["quick"],
        variants=p["variants"] or 6,
        requests=p["requests"],
        rate=p["rates"][0] if p["rates"] else None,
        seed=p["seed"],
        budget_bytes=p["budget"],
        workers=p["workers"],
        threads=p["threads"],
        planner=p["planner"],
        straggler_delay_s=p["straggler_delay"],
        baseline_threads=p["baseline_threads"],
        cache_dir=p["cache_dir"],
        systems=systems,
        dtype=p["dtype"],
        saturate=p["saturate"],
        device=p["device"],
        family=p["family_mode"],
        full_variants=p["full_variants"] if p["family_mode"] == "lora" else 0,
    )
    if p["rates"] and len(p["rates"]) > 1:
        _run_sweep(cfg, p)
        return
    run = _guarded(lambda: run_multitenant(cfg, _say))
    if p["plot"] is not None:
        family = run.doc["meta"]["family"]
        plot_cdf(run.outcomes, p["plot"], f"request latency, {family} family, same trace")
        _say(f"wrote {p['plot']}")
    if p["as_json"]:
        echo_json(run.doc)
        return
    meta = run.doc["meta"]
    t = meta["trace"]
    load = (
        f"{meta['saturate_clients']} closed-loop clients" if cfg.saturate else f"{t['rate_rps']}/s"
    )
    click.echo(
        f"{len(meta['tenants'])} tenants ({meta['family']}, {meta['dtype']}), {t['requests']} "
        f"requests at {load} (seed {t['seed']}), budget {meta['budget_bytes'] / 2**20:.1f} MiB, "
        f"{meta['cores']} cores, load average {meta['load_average'][0]}"
    )
    for line in table(run.doc):
        click.echo(line)


def _run_sweep(cfg: Any, p: dict[str, Any]) -> None:
    from blockllm.client.bench.multitenant import run_sweep
    from blockllm.client.bench.multitenant_report import sweep_table

    if cfg.saturate or p["plot"] is not None:
        raise click.UsageError("several --rate values: no --saturate, no --plot")
    doc = _guarded(lambda: run_sweep(cfg, p["rates"], _say))
    if p["as_json"]:
        echo_json(doc)
        return
    meta = doc["meta"]
    click.echo(
        f"{len(meta['tenants'])} tenants ({meta['family']}, {meta['dtype']}), "
        f"{meta['trace']['requests']} requests per rate (seed {meta['trace']['seed']}), "
        f"{meta['cores']} cores, load average {meta['load_average'][0]}"
    )
    for line in sweep_table(doc):
        click.echo(line)


def _guarded(fn: Any) -> Any:
    """Run `fn`, turning the failures a user can act on into one-line errors."""
    from blockllm.client.bench.memory import IsolatedError
    from blockllm.client.launcher import LaunchError
    from blockllm.zoo import ZooError
    from blockllm.zoo.models import ModelBuildError

    try:
        return fn()
    except (ModelBuildError, LaunchError, ZooError, ValueError, IsolatedError) as e:
        raise CliError(str(e)) from e


def _require_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise CliError("--plot needs matplotlib; install it with: pip install 'blockllm[plot]'")


def _run_full(p: dict[str, Any]) -> None:
    from blockllm.client.bench.full import FullConfig, curve_table, run_full_family

    cfg = FullConfig(quick=p["quick"], variants=p["variants"] or 3, cache_dir=p["cache_dir"])
    doc = _guarded(lambda: run_full_family(cfg, _say))
    if p["plot"] is not None:
        from blockllm.client.bench.full import plot_curve

        plot_curve(doc, p["plot"])
        _say(f"wrote {p['plot']}")
    if p["as_json"]:
        echo_json(doc)
        return
    for line in curve_table(doc):
        click.echo(line)
