"""`blockllm bench soak`: a bounded soak with seeded chaos (client/bench/soak.py)."""

from __future__ import annotations

from pathlib import Path

import click

from blockllm.client.bench.soak import FAULTS
from blockllm.client.cli.common import CliError, echo_json, json_option


@click.command("soak")
@click.option(
    "--zoo",
    "zoo_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    required=True,
    help="The zoo whose models are served.",
)
@click.option("--models", required=True, metavar="A,B", help="Tenants, comma-separated.")
@click.option(
    "--minutes",
    type=click.FloatRange(0.5, 120),
    default=5.0,
    show_default=True,
    help="How long the load runs (bounded).",
)
@click.option("--chaos", is_flag=True, help="Inject faults at seeded times (see --help text).")
@click.option(
    "--faults",
    default=",".join(FAULTS),
    show_default=True,
    metavar="KIND,...",
    help="With --chaos: the fault kinds to inject, each once, comma-separated.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Chaos schedule seed.")
@click.option("--streams", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--workers", type=click.IntRange(2, 8), default=3, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1, 512), default=16, show_default=True)
@json_option
def soak(
    zoo_dir: Path,
    models: str,
    minutes: float,
    chaos: bool,
    faults: str,
    seed: int,
    streams: int,
    workers: int,
    max_tokens: int,
    as_json: bool,
) -> None:
    """Serve the tenants for MINUTES under `streams` closed-loop greedy clients, checking every
    completion against HF generate; with --chaos also SIGKILL a worker (restarted, as systemd
    would), SIGSTOP one for 1-3 s, kill and restart the planner, and kill the broker and start
    a new one on the same address. Reports completed, failed (by error code), lost (accepted,
    never answered: must be 0), wrong tokens (must be 0), recovery per fault and RSS growth."""
    from blockllm.client.bench.soak import SoakConfig, run_soak

    names = tuple(m.strip() for m in models.split(",") if m.strip())
    if not names:
        raise CliError("--models needs at least one model")
    kinds = tuple(k.strip() for k in faults.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FAULTS]
    if unknown or not kinds:
        raise CliError(f"--faults: unknown kind(s) {unknown} (known: {', '.join(FAULTS)})")
    cfg = SoakConfig(
        zoo=str(zoo_dir),
        models=names,
        minutes=minutes,
        chaos=chaos,
        faults=kinds,
        seed=seed,
        streams=streams,
        workers=workers,
        max_new_tokens=max_tokens,
    )
    doc = run_soak(cfg, lambda s: click.echo(f"[bench] {s}", err=True))
    if as_json:
        echo_json(doc)
    else:
        for key in ("completed", "failed", "lost", "wrong", "recovery_s", "faults", "rss"):
            click.echo(f"{key}: {doc[key]}")
    if doc["lost"] or doc["wrong"]:
        raise CliError(f"soak: {doc['lost']} lost, {doc['wrong']} wrong")
