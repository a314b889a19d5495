"""`blockllm bench ...`: benchmarks. `bench stage` measures the stage engine against HF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from blockllm.client.bench.speculative import CUTS, PROMPTS, TOLERANCES
from blockllm.client.cli.common import CliError, echo_json, json_option


def _bench_say(text: str) -> None:
    click.echo(f"[bench] {text}", err=True)


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


def _tiny_model_dir() -> Path:
    """A tiny random Llama checkpoint, built once (whole or absent: built aside, renamed)."""
    import os
    import shutil
    import tempfile

    out = Path.home() / ".cache" / "blockllm" / "bench-tiny"
    if not (out / "config.json").is_file():
        from blockllm.zoo.tiny import build_tiny

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".bench-tiny-", dir=out.parent))
        try:
            build_tiny("llama", tmp, layers=8, hidden=128)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


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
    from blockllm.client.bench.stage import StageBenchConfig, run_stage_bench

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


# -- bench pipeline ---------------------------------------------------------------------------


def _streams(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected integers like 1,16") from None
    if not values or values[0] < 1:
        raise click.BadParameter(f"{text!r}: stream counts must be >= 1")
    return values


@bench.command("pipeline")
@click.option(
    "--model-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="HF checkpoint folder [default: SmolLM2 converted into ~/.cache/blockllm].",
)
@click.option(
    "--zoo",
    "zoo_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Zoo to import it into [default: ~/.cache/blockllm/bench-zoo].",
)
@click.option("--streams", default="1,16", show_default=True, help="Concurrent streams.")
@click.option("--new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=None,
    help="torch threads per worker [default: the cores split across workers].",
)
@click.option(
    "--inprocess-threads",
    type=click.IntRange(1),
    default=None,
    help="torch threads of the in-process engine [default: as many as all the workers "
    "together: equal cores].",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option(
    "--quick",
    is_flag=True,
    help="A tiny random Llama (built once into ~/.cache/blockllm/bench-tiny) instead of "
    "SmolLM2: a run of seconds that checks the machinery, not a measurement.",
)
@click.option(
    "--breakdown",
    is_flag=True,
    help="Also report where a decode token's time goes in the pipeline: ms per token per "
    "phase (compute, queueing, (de)serialisation, Python) per worker and in the broker "
    "(a table on stderr per stream count; 'breakdown' in --json).",
)
@json_option
def pipeline(
    model_dir: Path | None,
    zoo_dir: Path | None,
    streams: str,
    new_tokens: int,
    workers: int,
    threads: int | None,
    inprocess_threads: int | None,
    device: str,
    quick: bool,
    breakdown: bool,
    as_json: bool,
) -> None:
    """Generation tokens/s over broker + workers vs the engine in-process, 1 and N streams."""
    if model_dir is None:
        model_dir = _tiny_model_dir() if quick else _default_model_dir("float32")
    from blockllm.client.bench.pipeline import PipelineBenchConfig, run_pipeline_bench

    cfg = PipelineBenchConfig(
        model_dir=model_dir,
        zoo_dir=zoo_dir or Path.home() / ".cache" / "blockllm" / "bench-zoo",
        streams=_streams(streams),
        new_tokens=new_tokens,
        workers=workers,
        threads_per_worker=threads,
        inprocess_threads=inprocess_threads,
        device=device,
        breakdown=breakdown,
    )
    result = run_pipeline_bench(cfg)
    if as_json:
        echo_json(result)
        return
    for r in result["results"]:
        click.echo(
            f"{r['streams']:3d} streams: pipeline {r['pipeline_tok_s']:8.1f} tok/s, "
            f"in-process {r['inprocess_tok_s']:8.1f} tok/s, ratio {r['ratio']:.2f}"
        )
    click.echo(f"concurrency speedup (pipeline): {result['concurrency_speedup']:.2f}x")


# -- bench speculative ------------------------------------------------------------------------


def _floats(ctx: Any, param: Any, value: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: comma-separated numbers, e.g. 0,0.1,0.3") from None
    if not values or min(values) < 0:
        raise click.BadParameter(f"{value!r}: tolerances must be >= 0")
    return values


def _cuts(ctx: Any, param: Any, value: str) -> tuple[tuple[int, int, int], ...]:
    cuts = []
    for part in value.split(","):
        bits = part.strip().split("-")
        if len(bits) != 3 or not all(b.isdigit() for b in bits):
            raise click.BadParameter(f"{part!r}: a cut is A-B-C (chain positions), e.g. 12-16-20")
        a, b, c = (int(x) for x in bits)
        cuts.append((a, b, c))
    return tuple(cuts)


@bench.command("speculative")
@click.option(
    "--tolerances",
    default=",".join(str(t) for t in TOLERANCES),
    show_default=True,
    callback=_floats,
    help="Relative input distances ||real - predicted|| / ||real|| accepted.",
)
@click.option(
    "--cuts",
    default=",".join("-".join(str(x) for x in c) for c in CUTS),
    show_default=True,
    callback=_cuts,
    help="A-B-C: stage k = chain positions [A, B), stage k+1 = [B, C) (0 = embed).",
)
@click.option("--prompts", type=click.IntRange(1, len(PROMPTS)), default=6, show_default=True)
@click.option("--new-tokens", type=click.IntRange(2), default=24, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="torch intra-op threads.")
@click.option("--quick", is_flag=True, help="A tiny random Llama family instead of SmolLM2.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Family cache [default: ~/.cache/blockllm/bench].",
)
@json_option
def speculative(
    tolerances: tuple[float, ...],
    cuts: tuple[tuple[int, int, int], ...],
    prompts: int,
    new_tokens: int,
    threads: int | None,
    quick: bool,
    cache_dir: Path | None,
    as_json: bool,
) -> None:
    """Speculative execution on SmolLM2 and a fine-tune: input distance between stage k+1's
    real and predicted input, acceptance per tolerance, greedy agreement with exact serving,
    decode latency saved (in-process stage engine)."""
    from blockllm.client.bench.speculative import SpeculativeConfig, run_speculative_bench

    cfg = SpeculativeConfig(tolerances, cuts, prompts, new_tokens, threads, cache_dir, quick)
    try:
        doc = run_speculative_bench(cfg, _bench_say)
    except ValueError as e:
        raise CliError(str(e)) from e
    if as_json:
        echo_json(doc)
        return
    load = doc["load_average"]
    click.echo(
        f"speculative execution: {', '.join(doc['models'])}, {doc['prompts']} prompts x"
        f" {doc['new_tokens']} tokens, {doc['threads']} threads (load {load[0]} -> {load[1]})"
    )
    head = f"{'model':<16} {'cut':<9} {'dist p50':>8} {'tol':>5} {'accept':>6} {'agree':>6}"
    click.echo(f"{head} {'prefix':>6} {'same':>4} {'saved ms':>8} {'saved %':>7} {'Δ accept':>8}")
    for row in doc["results"]:
        cut = "-".join(str(x) for x in row["cut"])
        for t in row["tolerances"]:
            click.echo(
                f"{row['model']:<16} {cut:<9} {row['distance']['p50']:>8.3f} {t['tolerance']:>5}"
                f" {t['acceptance']:>6.2f} {t['token_agreement']:>6.2f}"
                f" {t['prefix_agreement']:>6.2f} {t['sequences_identical']:>4}"
                f" {t['saved_ms_per_step']:>8.2f} {t['saved_pct_of_step']:>7.2f}"
                f" {t['acceptance_delta_predictor']:>8.2f}"
            )


@bench.command("http")
@click.option("--quick", is_flag=True, help="A tiny random family instead of SmolLM2.")
@click.option(
    "--streams",
    type=click.IntRange(1, 256),
    default=16,
    show_default=True,
    help="Requests in flight at all times.",
)
@click.option(
    "--requests",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Requests per round and system.",
)
@click.option(
    "--rounds",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Alternating native/HTTP rounds after the warm-up.",
)
@click.option("--variants", type=click.IntRange(0, 16), default=3, show_default=True)
@click.option("--workers", type=click.IntRange(1, 8), default=2, show_default=True)
@json_option
def http(
    quick: bool,
    streams: int,
    requests: int,
    rounds: int,
    variants: int,
    workers: int,
    as_json: bool,
) -> None:
    """What the OpenAI-compatible HTTP API costs over the native client: the same
    concurrent greedy streams through both (TTFT, inter-token latency, tokens/s)."""
    from blockllm.client.bench.http_api import HttpBenchConfig, report, run_http_bench

    cfg = HttpBenchConfig(
        quick=quick,
        variants=variants,
        streams=streams,
        requests=requests,
        rounds=rounds,
        workers=workers,
    )
    doc = run_http_bench(cfg, _bench_say)
    if as_json:
        echo_json(doc)
        return
    for line in report(doc):
        click.echo(line)


@bench.command("mixed")
@click.option("--workers", type=click.IntRange(1, 8), default=2, show_default=True)
@click.option("--requests", type=click.IntRange(1), default=48, show_default=True)
@click.option("--concurrency", type=click.IntRange(1), default=12, show_default=True)
@click.option("--new-tokens", type=click.IntRange(1), default=24, show_default=True)
@click.option("--layers", type=click.IntRange(1), default=8, show_default=True)
@click.option("--hidden", type=click.IntRange(8), default=256, show_default=True)
@json_option
def mixed(
    workers: int,
    requests: int,
    concurrency: int,
    new_tokens: int,
    layers: int,
    hidden: int,
    as_json: bool,
) -> None:
    """Tokens/s of a 3-family, 6-tenant trace (tiny llama, qwen2, mistral of three KV
    geometries and a fine-tune of each) on workers hosting every family, against the same
    trace with one family per worker."""
    from blockllm.client.bench.mixed import MixedBenchConfig, report, run_mixed_bench

    cfg = MixedBenchConfig(workers, requests, concurrency, new_tokens, layers, hidden)
    doc = run_mixed_bench(cfg, _bench_say)
    if as_json:
        echo_json(doc)
        return
    for line in report(doc):
        click.echo(line)


def _register() -> None:
    """Attach the subcommands that live in their own modules."""
    from blockllm.client.cli.bench_multitenant import multitenant
    from blockllm.client.cli.bench_scale import scale
    from blockllm.client.cli.bench_soak import soak

    bench.add_command(multitenant)
    bench.add_command(scale)
    bench.add_command(soak)


_register()
