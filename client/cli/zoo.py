"""`blockllm zoo ...`: the offline block zoo (thin layer over blockllm.zoo.Zoo)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from blockllm.client.cli.common import CliError, default_zoo_dir, echo_json, json_option, zoo_option


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Zoo failures become CliError: one line `error: ...`, exit 1."""
    from blockllm.zoo import ZooError

    try:
        yield
    except ZooError as e:
        raise CliError(str(e)) from e


def _open(zoo_dir: Path | None) -> Any:
    from blockllm.zoo import Zoo

    with _errors():
        return Zoo(zoo_dir or default_zoo_dir())


def _progress(label: str, quiet: bool):
    if quiet:
        return None

    def report(done: int, total: int) -> None:
        click.echo(f"{label} {done}/{total}", err=True)

    return report


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@click.group("zoo")
def zoo() -> None:
    """The offline block zoo: import, list, verify, export, measure equivalence, gc."""


@zoo.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Model name (letters, digits, '-', '_', '.').")
@click.option(
    "--base",
    default=None,
    help="For a PEFT LoRA adapter folder: the zoo model it sits on [default: the one its "
    "adapter_config.json names, matched by name or content].",
)
@click.option("--force", is_flag=True, help="Replace an existing model of that name.")
@zoo_option
@json_option
def import_cmd(
    path: Path, name: str, base: str | None, force: bool, zoo_dir: Path | None, as_json: bool
) -> None:
    """Import the local HF checkpoint folder PATH as model NAME.

    PATH may also be a PEFT LoRA adapter folder (adapter_config.json +
    adapter_model.safetensors): it is stored as per-layer adapter blocks on top of its base
    model's chain and served as a tenant of its own.
    """
    from blockllm.zoo.adapters import is_adapter_folder

    z = _open(zoo_dir)
    progress = _progress(f"[import {name}] block", as_json)
    with _errors():
        if is_adapter_folder(path):
            m = z.import_adapter(path, name, progress, base=base, force=force)
        elif base is not None:
            raise CliError(f"--base is for PEFT adapter folders; {path} has no adapter_config.json")
        else:
            m = z.import_checkpoint(path, name, progress, force=force)
    added = m.source["written_bytes"]  # blocks this import wrote (the rest were deduped)
    adapter_bytes = sum(m.adapter["block_bytes"]) if m.adapter else 0
    info = {
        "name": m.name,
        "model_type": m.model_type,
        "dtype": m.dtype,
        "layers": m.num_layers,
        "blocks": len(m.chain),
        "logical_bytes": sum(m.block_bytes) + adapter_bytes,
        "added_bytes": added,
        "tokenizer": m.tokenizer,
    }
    if m.adapter is not None:
        info["adapter"] = {
            "base": m.adapter["base"],
            "layers": len(m.adapter_blocks),
            "bytes": adapter_bytes,
            "ranks": sorted(set(m.adapter["ranks"].values())),
            "targets": m.adapter["targets"],
        }
    if as_json:
        echo_json(info)
    elif m.adapter is not None:
        a = info["adapter"]
        click.echo(
            f"imported {m.name}: LoRA adapter on {a['base']}, {a['layers']} layers "
            f"({', '.join(a['targets'])}; rank {'/'.join(map(str, a['ranks']))}), "
            f"{fmt_bytes(adapter_bytes)} ({fmt_bytes(added)} new on disk)"
        )
    else:
        click.echo(
            f"imported {m.name}: {m.model_type} {m.dtype}, {m.num_layers} layers, "
            f"{fmt_bytes(info['logical_bytes'])} ({fmt_bytes(added)} new on disk)"
        )


def _equiv_by_model(z: Any) -> dict[str, list[dict[str, Any]]]:
    """Each model's measured substitutes: records whose original sits in its chain there."""
    records = z.equivalences()
    out: dict[str, list[dict[str, Any]]] = {}
    for name, m in z.manifests().items():
        out[name] = [
            {
                "position": r.position,
                "original": r.original,
                "substitute": r.substitute,
                "kl": r.kl,
                "agreement": r.agreement,
                "rel_error": r.rel_error,
            }
            for r in records
            if r.position < len(m.chain) and m.chain[r.position] == r.original
        ]
    return out


def _equiv_summary(recs: list[dict[str, Any]]) -> str:
    if not recs:
        return "-"
    kl = min(r["kl"] for r in recs)
    agree = max(r["agreement"] for r in recs)
    return f"{len(recs)} (best kl {kl:.2g}, agree {agree:.3f})"


@zoo.command("ls")
@zoo_option
@json_option
def ls_cmd(zoo_dir: Path | None, as_json: bool) -> None:
    """List models: type, layers, dtype, bytes, unique bytes, equivalence scores."""
    z = _open(zoo_dir)
    with _errors():
        usage = z.du()["models"]
        equiv = _equiv_by_model(z)
    if as_json:
        echo_json({n: {**usage[n], "equivalence": equiv.get(n, [])} for n in usage})
        return
    if not usage:
        click.echo(f"no models in {z.root}")
        return
    rows = [("NAME", "TYPE", "LAYERS", "DTYPE", "BYTES", "UNIQUE", "EQUIV")]
    for n, u in usage.items():
        adapter = u.get("adapter")
        rows.append(
            (
                n,
                f"lora r{'/'.join(map(str, adapter['ranks']))} on {adapter['base']}"
                if adapter
                else u["model_type"],
                str(u["layers"]),
                u["dtype"],
                fmt_bytes(u["logical_bytes"]),
                fmt_bytes(u["unique_bytes"]),
                _equiv_summary(equiv.get(n, [])),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@zoo.command("du")
@zoo_option
@json_option
def du_cmd(zoo_dir: Path | None, as_json: bool) -> None:
    """Disk usage: logical vs physical bytes, shared blocks, per-model unique bytes."""
    z = _open(zoo_dir)
    with _errors():
        usage = z.du()
    if as_json:
        echo_json(usage)
        return
    saved = usage["logical_bytes"] - usage["physical_bytes"]
    click.echo(f"logical   {fmt_bytes(usage['logical_bytes'])}")
    click.echo(f"physical  {fmt_bytes(usage['physical_bytes'])} (dedup saves {fmt_bytes(saved)})")
    click.echo(f"blocks    {usage['blocks']} ({usage['shared_blocks']} shared)")
    for n, u in usage["models"].items():
        click.echo(f"  {n}: {fmt_bytes(u['logical_bytes'])}, unique {fmt_bytes(u['unique_bytes'])}")


@zoo.command("verify")
@zoo_option
@json_option
def verify_cmd(zoo_dir: Path | None, as_json: bool) -> None:
    """Re-hash every block and tokenizer; exit non-zero naming each bad one."""
    z = _open(zoo_dir)
    with _errors():
        report = z.verify()
    if as_json:
        echo_json(report.to_dict())
    else:
        for b in report.bad:
            users = ", ".join(b.models) or "no model"
            click.echo(f"BAD {b.kind} {b.id}: {b.reason} (used by: {users})")
        click.echo(
            f"checked {report.blocks_checked} blocks, {report.tokenizers_checked} tokenizers, "
            f"{report.models_checked} models: {'ok' if report.ok else f'{len(report.bad)} bad'}"
        )
    if not report.ok:
        names = ", ".join(
            f"{b.kind} {b.id} (models: {', '.join(b.models) or '-'})" for b in report.bad
        )
        raise CliError(f"verify failed: {names}")


@zoo.command("export")
@click.argument("name")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@zoo_option
def export_cmd(name: str, out_dir: Path, zoo_dir: Path | None) -> None:
    """Write model NAME as a HF checkpoint folder OUT_DIR (new or empty).

    An adapter is written as a PEFT adapter folder (adapter_config.json +
    adapter_model.safetensors) that PeftModel.from_pretrained loads over its base.
    """
    z = _open(zoo_dir)
    with _errors():
        z.export(name, out_dir)
    click.echo(f"exported {name} to {out_dir}")


@zoo.command("rm")
@click.argument("name")
@zoo_option
def rm_cmd(name: str, zoo_dir: Path | None) -> None:
    """Remove model NAME (its blocks are freed by `zoo gc`)."""
    z = _open(zoo_dir)
    with _errors():
        z.remove(name)
    click.echo(f"removed {name} (run `blockllm zoo gc` to free unreferenced blocks)")


@zoo.command("gc")
@zoo_option
@json_option
def gc_cmd(zoo_dir: Path | None, as_json: bool) -> None:
    """Delete blocks and tokenizers no model references, and stale temp files."""
    z = _open(zoo_dir)
    with _errors():
        report = z.gc()
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(
            f"removed {report.removed_blocks} blocks ({fmt_bytes(report.freed_bytes)}), "
            f"{report.removed_tokenizers} tokenizers, {report.removed_temp_files} temp files, "
            f"{report.removed_equivalence} equivalence records"
        )


@zoo.command("equiv")
@click.option(
    "--prompts",
    default=8,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="Calibration prompts.",
)
@click.option(
    "--seq-len",
    default=32,
    show_default=True,
    type=click.IntRange(2, 4096),
    help="Tokens per calibration prompt.",
)
@click.option("--force", is_flag=True, help="Re-measure pairs already recorded.")
@zoo_option
@json_option
def equiv_cmd(prompts: int, seq_len: int, force: bool, zoo_dir: Path | None, as_json: bool) -> None:
    """Measure equivalence of differing blocks at the same position of one family."""
    z = _open(zoo_dir)
    with _errors():
        result = z.measure_equivalence(
            prompts=prompts,
            seq_len=seq_len,
            force=force,
            progress=_progress("[equiv] pair", as_json),
        )
    if as_json:
        echo_json({"measured": [r.to_dict() for r in result.measured], "skipped": result.skipped})
        return
    for r in result.measured:
        click.echo(
            f"{r.host_model} pos {r.position}: {r.original[:12]} -> {r.substitute[:12]}  "
            f"kl {r.kl:.3g}  agree {r.agreement:.3f}  rel_err {r.rel_error:.3g}"
        )
    click.echo(f"measured {len(result.measured)} pairs, skipped {result.skipped} already measured")
