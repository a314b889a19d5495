"""`blockllm demo`: SmolLM2, three fine-tuned tenants, one zoo, a local cluster, four answers
streamed side by side (see `client/demo.py` for the phases).

On a terminal the answers are redrawn live in columns; otherwise (a pipe, a CI log) each
tenant's text comes out as it arrives, in interleaved lines prefixed by the tenant's name, and
the answers are printed side by side at the end.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from blockllm.client.cli.common import CliError

MiB = 2**20


def _phase(n: int, text: str) -> None:
    click.echo(click.style(f"[{n}/6] {text}", bold=True))


def _note(text: str) -> None:
    click.echo(f"      {text}")


# -- rendering the streams ------------------------------------------------------------------


class LinesView:
    """Non-TTY: a tenant's text in chunks (at a line end or past ~40 characters at a space),
    each on its own line prefixed by the tenant; called from the stream threads."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.width = max(len(n) for n in names)
        self.buf = ["" for _ in names]
        self.lock = threading.Lock()

    def on_text(self, i: int, text: str) -> None:
        with self.lock:
            self.buf[i] += text
            while True:
                chunk, rest = self._split(self.buf[i])
                if chunk is None:
                    return
                self._emit(i, chunk)
                self.buf[i] = rest

    @staticmethod
    def _split(buf: str) -> tuple[str | None, str]:
        if "\n" in buf:
            head, _, rest = buf.partition("\n")
            return head, rest
        if len(buf) >= 40 and " " in buf[30:]:
            cut = buf.index(" ", 30)
            return buf[:cut], buf[cut + 1 :]
        return None, buf

    def _emit(self, i: int, chunk: str) -> None:
        click.echo(f"  {self.names[i]:>{self.width}} | {chunk}")

    def close(self) -> None:
        with self.lock:
            for i, rest in enumerate(self.buf):
                if rest.strip():
                    self._emit(i, rest)
                self.buf[i] = ""


class ColumnsView:
    """TTY: every tenant's answer so far in its own column, redrawn ~10 times a second."""

    def __init__(self, names: Sequence[str], answers: Sequence[Any], height: int = 12) -> None:
        self.names, self.answers, self.height = list(names), answers, height
        cols = shutil.get_terminal_size((120, 24)).columns
        self.width = max(16, (cols - 3 * (len(names) - 1)) // len(names))
        self.drawn = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="demo-columns", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def on_text(self, i: int, text: str) -> None:
        pass  # the redraw loop reads the answers themselves

    def _loop(self) -> None:
        while not self.stop.wait(0.1):
            self.draw()

    def draw(self) -> None:
        texts = []
        for a in self.answers:
            with a.lock:
                texts.append(a.text)
        lines = side_by_side(self.names, texts, self.width, self.height)
        out = (f"\x1b[{self.drawn}F\x1b[J" if self.drawn else "") + "\n".join(lines)
        click.echo(out)
        self.drawn = len(lines)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.draw()


def side_by_side(names: Sequence[str], texts: Sequence[str], width: int, height: int) -> list[str]:
    """Columns of wrapped text under each name (the last `height` lines of each)."""
    wrapped = []
    for t in texts:
        lines = [w for para in t.strip().split("\n") for w in textwrap.wrap(para, width) or [""]]
        wrapped.append(lines[-height:])
    rows = max(len(w) for w in wrapped)
    out = [" | ".join(f"{n[:width]:<{width}}" for n in names)]
    out.append("-+-".join("-" * width for _ in names))
    for r in range(rows):
        out.append(" | ".join(f"{(w[r] if r < len(w) else ''):<{width}}" for w in wrapped))
    return out


# -- phases -----------------------------------------------------------------------------------


def _show_zoo(family: Any) -> None:
    from blockllm.client.bench.demo import zoo_usage

    du = zoo_usage(family)
    logical, physical = du["logical_bytes"], du["physical_bytes"]
    _note(
        f"{len(du['models'])} models, {du['blocks']} distinct blocks ({du['shared_blocks']} "
        f"shared): logical {logical / MiB:.1f} MiB, on disk {physical / MiB:.1f} MiB "
        f"({logical / max(1, physical):.1f}x less than storing each model whole)"
    )
    for name, m in du["models"].items():
        _note(
            f"  {name:<16} {m['layers']} layers, {m['logical_bytes'] / MiB:7.1f} MiB, "
            f"of which only its own: {m['unique_bytes'] / MiB:6.1f} MiB"
        )


def _show_cluster(family: Any, status: dict[str, Any]) -> None:
    from blockllm.zoo import Zoo
    from blockllm.zoo.chain import stage_key

    zoo = Zoo(family.zoo_dir)
    manifests = [zoo.manifest(n) for n in family.names]
    for w in sorted(status.get("workers", []), key=lambda w: str(w.get("name"))):
        parts = []
        for s in sorted(w.get("stages", []), key=lambda s: (s["start"], s["end"])):
            users = [m.name for m in manifests if stage_key(m, s["start"], s["end"]) == s["key"]]
            who = "all tenants" if len(users) == len(manifests) else ", ".join(users)
            parts.append(f"[{s['start']},{s['end']}) {who}")
        _note(f"{w.get('name')} (pid {w.get('pid')}): " + "; ".join(parts))


def _stream(endpoint: str, family: Any, cfg: Any) -> tuple[list[Any], float]:
    from blockllm.client.bench.demo import Answer, prompt_ids, stream_answers

    ids = prompt_ids(family, cfg.question)
    names = list(family.names)
    _note(f'question (to every tenant at once): "{cfg.question}"')
    tty = sys.stdout.isatty()
    placeholder = [Answer(n) for n in names]
    view: Any = ColumnsView(names, placeholder) if tty else LinesView(names)
    holder: dict[str, Any] = {}
    if tty:
        view.start()

    def on_text(i: int, text: str) -> None:
        a = placeholder[i]
        with a.lock:
            a.text += text
        view.on_text(i, text)

    try:
        answers, wall = stream_answers(endpoint, names, ids, cfg.max_tokens, on_text)
        holder["answers"] = answers
    finally:
        view.close()
    if not tty:
        click.echo("")
        for line in side_by_side(names, [a.text for a in answers], 28, 40):
            click.echo(f"  {line}")
    return answers, wall


def _show_results(answers: Sequence[Any], wall: float) -> None:
    _note(f"{'tenant':<16} {'tokens':>6} {'first token':>11} {'done':>8} {'tok/s':>6}  end")
    for a in answers:
        if a.error:
            _note(f"{a.tenant:<16} error: {a.error}")
            continue
        ttft = (a.first_token_s or 0) * 1000
        done = a.finish_s or wall
        _note(
            f"{a.tenant:<16} {a.tokens:>6} {ttft:>8.0f} ms {done * 1000:>5.0f} ms "
            f"{a.tokens / max(done, 1e-9):>6.1f}  {a.finish_reason}"
        )
    total = sum(a.tokens for a in answers)
    _note(
        f"{len(answers)} concurrent streams: {total} tokens in {wall:.2f} s = "
        f"{total / max(wall, 1e-9):.1f} tokens/s together"
    )


def _show_http(url: str, model: str, cfg: Any) -> None:
    """The same cluster through its OpenAI-compatible API: the curl line, and its answer."""
    from blockllm.client.bench.demo import http_example

    _note(f"the same tenants over the OpenAI-compatible API at {url} (`blockllm serve --http`):")
    curl, text = http_example(url, model, cfg.question, not cfg.tiny, min(cfg.max_tokens, 32))
    click.echo(f"  $ {curl}")
    _note(f"-> {text.strip()[:200]!r}")


@click.command()
@click.option(
    "--tiny",
    is_flag=True,
    help="A tiny random Llama family instead of SmolLM2 "
    "(seconds; for tests: its answers are noise).",
)
@click.option("--max-tokens", type=click.IntRange(1, 512), default=48, show_default=True)
@click.option("--question", default=None, help="What every tenant is asked.")
@click.option("--workers", type=click.IntRange(1, 8), default=2, show_default=True)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Tenants and zoo [default: ~/.cache/blockllm/demo].",
)
def demo(
    tiny: bool, max_tokens: int, question: str | None, workers: int, cache_dir: Path | None
) -> None:
    """Set up SmolLM2 and three fine-tuned tenants in a block zoo (cached after the first
    run), start a local cluster, stream one answer from each tenant side by side, print
    latency and throughput, and stop."""
    from blockllm.client.bench.demo import QUESTION, DemoConfig

    cfg = DemoConfig(
        tiny=tiny,
        variants=3,
        workers=workers,
        max_tokens=max_tokens,
        question=question or QUESTION,
        cache_dir=cache_dir,
    )
    t0 = time.monotonic()
    try:
        _run(cfg)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        from blockllm.client.launcher import LaunchError
        from blockllm.zoo import ZooError
        from blockllm.zoo.models import ModelBuildError

        if isinstance(e, (ModelBuildError, LaunchError, ZooError)):
            raise CliError(str(e)) from e
        raise
    click.echo(f"demo done in {time.monotonic() - t0:.1f} s")


def _run(cfg: Any) -> None:
    from blockllm.client.bench.demo import leftover_children, local_cluster, prepare

    base = "a tiny random Llama" if cfg.tiny else "SmolLM2-135M-Instruct"
    _phase(1, f"{base} and {cfg.variants} fine-tuned tenants (cached after the first run)")
    t = time.monotonic()
    family = prepare(cfg, _note)
    for tenant in family.tenants[1:]:
        lo, hi = tenant.layers or (0, 0)
        _note(f"{tenant.name}: its own fine-tune of layers {lo}-{hi}")
    _note(f"ready in {time.monotonic() - t:.1f} s")
    _phase(2, f"the block zoo at {family.zoo_dir}: identical blocks stored once")
    _show_zoo(family)
    _phase(3, f"starting a local cluster: broker + {cfg.workers} worker processes")
    t = time.monotonic()
    with local_cluster(family, cfg) as (endpoint, status, http):
        _note(f"broker at {endpoint}, ready in {time.monotonic() - t:.1f} s")
        _show_cluster(family, status)
        _phase(4, f"streaming one answer from each of the {len(family.names)} tenants")
        answers, wall = _stream(endpoint, family, cfg)
        _phase(5, "latency and throughput")
        _show_results(answers, wall)
        _show_http(http, family.names[-1], cfg)
        _phase(6, "stopping the cluster")
    left = leftover_children()
    if left:
        raise CliError(f"processes left after the stop: {left}")
    _note("stopped cleanly: no process left")
    failed = [a.tenant for a in answers if a.error]
    if failed:
        raise CliError(f"no answer from {', '.join(failed)}")
