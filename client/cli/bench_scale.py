"""`blockllm bench scale`: the planner and the broker at thousands of tenants and hundreds of
workers, simulated (see `client/bench/scale.py`). Progress on stderr; the table or `--json` on
stdout.
"""

from __future__ import annotations

import logging

import click

from blockllm.client.cli.common import echo_json, json_option


def _say(text: str) -> None:
    click.echo(f"[bench] {text}", err=True)


@click.command("scale")
@click.option(
    "--models",
    type=click.IntRange(2, 100_000),
    default=18,
    show_default=True,
    help="Tenants (about sqrt(N/5) families of 32-layer models; fine-tunes own 2 layers).",
)
@click.option(
    "--workers", type=click.IntRange(2, 10_000), default=4, show_default=True, help="Workers."
)
@click.option(
    "--table",
    is_flag=True,
    help="The issue's table: 18/4, 105/16, 510/64 and 2,020/256 (the larger sizes take long; "
    "ignores --models, --workers).",
)
@click.option(
    "--duration",
    type=click.FloatRange(1.0),
    default=20.0,
    show_default=True,
    help="Simulated seconds of the day-in-the-life trace.",
)
@click.option(
    "--rate",
    type=click.FloatRange(0.1),
    default=None,
    help="Requests per simulated second.  [default: 2 x workers]",
)
@click.option(
    "--tokens",
    type=click.IntRange(1, 1024),
    default=16,
    show_default=True,
    help="New tokens per request (prompts are 64 tokens).",
)
@click.option(
    "--worker-gb",
    type=click.FloatRange(1.0),
    default=8.0,
    show_default=True,
    help="Weight memory per worker.",
)
@click.option(
    "--per-node", type=click.IntRange(1), default=8, show_default=True, help="Workers per node."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the cluster and the trace."
)
@json_option
def scale(
    models: int,
    workers: int,
    table: bool,
    duration: float,
    rate: float | None,
    tokens: int,
    worker_gb: float,
    per_node: int,
    seed: int,
    as_json: bool,
) -> None:
    """Placement latency (full and after a lost worker), the broker's CPU per routed message
    and per token, STATUS/STATS sizes, planner command bursts and the layout's quality, from
    the REAL broker and planner driven by simulated workers and clients on a simulated clock."""
    from blockllm.client.bench.scale import SIZES, meta, run_size
    from blockllm.client.bench.scale import table as render

    logging.getLogger("blockllm").setLevel(logging.ERROR)  # the trace kills workers on purpose
    sizes = SIZES if table else ((models, workers),)
    rows = [
        run_size(
            m,
            w,
            duration=duration,
            rate=rate,
            tokens=tokens,
            capacity=int(worker_gb * (1 << 30)),
            per_node=per_node,
            seed=seed,
            progress=_say,
        )
        for m, w in sizes
    ]
    if as_json:
        echo_json({"results": rows, "meta": meta()})
        return
    click.echo(render(rows))
