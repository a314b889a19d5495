"""`blockllm bench ...`: benchmarks. `bench stage` measures the stage engine against HF."""

from __future__ import annotations

from pathlib import Path

import click

from blockllm.client.cli_common import CliError, echo_json, json_option


@click.group()
def bench() -> None:
    """Benchmarks (progress on stderr, results on stdout)."""


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: expected comma-separated integers, e.g. 1,8,32"
        ) from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: batch sizes must be >= 1")
    return values


def _default_model_dir(dtype: str) -> Path:
    """SmolLM2 converted once into ~/.cache/blockllm/smollm2-<dtype> (reused afterwards)."""
    from blockllm.zoo.models import ModelBuildError, convert_smollm2

    out = Path.home() / ".cache" / "blockllm" / f"smollm2-{dtype}"
    try:
        return convert_smollm2(out, dtype=dtype, progress=lambda m: click.echo(m, err=True))
    except ModelBuildError as e:
        raise CliError(f"cannot prepare SmolLM2 (pass --model-dir DIR instead): {e}") from e


@bench.command("stage")
@click.option(
    "--model-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="HF checkpoint folder [default: SmolLM2 converted into ~/.cache/blockllm].",
)
@click.option("--batches", default="1,8,32", show_default=True, help="Batch sizes to measure.")
@click.option(
    "--steps",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="Timed decode steps per engine and batch size.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Weights and activations dtype.",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=None,
    help="torch intra-op threads [default: torch's default].",
)
@json_option
def stage(
    model_dir: Path | None,
    batches: str,
    steps: int,
    dtype: str,
    threads: int | None,
    as_json: bool,
) -> None:
    """Decode tokens/s of the stage engine vs HF's own forward (DynamicCache, left-padded
    batch) on the same checkpoint, at each batch size, with ragged prompt lengths."""
    from blockllm.worker.bench import StageBenchConfig, run_stage_bench

    cfg = StageBenchConfig(
        model_dir=model_dir or _default_model_dir(dtype),
        batches=_batches(batches),
        steps=steps,
        dtype=dtype,
        threads=threads,
    )
    try:
        doc = run_stage_bench(cfg, progress=lambda m: click.echo(m, err=True))
    except ValueError as e:
        raise CliError(str(e)) from e
    if as_json:
        echo_json(doc)
        return
    load = doc["load_average"]
    click.echo(
        f"stage engine vs HF: {doc['model']} {doc['dtype']}, {doc['threads']} threads,"
        f" {doc['steps']} decode steps (load average {load[0]} -> {load[1]})"
    )
    click.echo(f"{'batch':>5}  {'blockllm tok/s':>14}  {'hf tok/s':>9}  {'ratio':>6}")
    for r in doc["results"]:
        click.echo(
            f"{r['batch']:>5}  {r['blockllm_tok_s']:>14.1f}  {r['hf_tok_s']:>9.1f}"
            f"  {r['ratio']:>6.2f}"
        )


def _register() -> None:
    """Attach the subcommands that live in their own modules."""
    from blockllm.client.cli_bench_multitenant import multitenant
    from blockllm.client.cli_bench_pipeline import pipeline

    bench.add_command(pipeline)
    bench.add_command(multitenant)
    from blockllm.client.bench_speculative import speculative

    bench.add_command(speculative)
    from blockllm.client.http.bench import bench_command

    bench.add_command(bench_command())


_register()
