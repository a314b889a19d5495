"""`blockllm generate` and `blockllm status`: thin click commands over `Client`.

Exit codes: 0 ok; 1 request failed (or, for status, a model not covered by workers); 2 usage;
3 unknown model; 4 timeout or broker unreachable; 5 bad request; 6 overloaded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from blockllm.broker.ratelog import few
from blockllm.client.cli.common import CliError, echo_json, json_option
from blockllm.client.client import Client
from blockllm.client.demux import require_covered
from blockllm.client.errors import (
    BadRequest,
    BlockLLMError,
    Overloaded,
    Timeout,
    UnknownModel,
)
from blockllm.client.request import GenerateParams

DEFAULT_BROKER = "tcp://127.0.0.1:5555"
EXIT_FAILED = 1
EXIT_UNKNOWN_MODEL = 3
EXIT_TIMEOUT = 4
EXIT_BAD_REQUEST = 5
EXIT_OVERLOADED = 6
_EXIT_CODES: tuple[tuple[type[BlockLLMError], int], ...] = (
    (UnknownModel, EXIT_UNKNOWN_MODEL),
    (Timeout, EXIT_TIMEOUT),  # BrokerUnavailable is a Timeout too
    (BadRequest, EXIT_BAD_REQUEST),
    (Overloaded, EXIT_OVERLOADED),
)

broker_option = click.option(
    "--broker",
    envvar="BLOCKLLM_BROKER",
    default=DEFAULT_BROKER,
    show_default=True,
    show_envvar=True,
    help="Broker address.",
)
keys_option = click.option(
    "--keys",
    "keys_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="BLOCKLLM_KEYS",
    help="CurveZMQ keys folder (client.key_secret and broker.key, from `blockllm keys gen`) "
    "[default: $BLOCKLLM_KEYS].",
)


def exit_code_for(e: BlockLLMError) -> int:
    for cls, code in _EXIT_CODES:
        if isinstance(e, cls):
            return code
    return EXIT_FAILED


@contextmanager
def cli_errors() -> Iterator[None]:
    """Typed client errors become a one-line CliError with a distinct exit code."""
    try:
        yield
    except BlockLLMError as e:
        raise CliError(f"{e.code}: {e.message}", exit_code_for(e)) from None


def parse_ids(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        ids = [int(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise click.BadParameter("expected comma-separated token ids, e.g. 1,2,3") from None
    if not ids:
        raise click.BadParameter("no token ids given")
    return ids


def read_prompt(prompt: str | None, input_ids: list[int] | None) -> str | None:
    """PROMPT, or stdin when PROMPT is '-' or absent without --input-ids (one trailing newline
    dropped: `echo hi | blockllm generate` sends "hi")."""
    if input_ids is not None:
        if prompt is not None:
            raise click.UsageError("give PROMPT or --input-ids, not both")
        return None
    if prompt is None or prompt == "-":
        text = sys.stdin.read()
        prompt = text[:-1] if text.endswith("\n") else text
    if not prompt:
        raise click.UsageError("empty prompt (give PROMPT, pipe text on stdin, or --input-ids)")
    return prompt


@click.command()
@broker_option
@click.option("--model", required=True, help="Model name (as in the zoo).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--input-ids", "input_ids_text", default=None, help="Token ids in, e.g. 1,2,3.")
@json_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    help="Seconds for the whole request [default: none].",
)
@keys_option
@click.option(
    "--chat",
    is_flag=True,
    help="PROMPT is a user message: apply the model's chat template (its tokenizer from the "
    "broker's zoo), as POST /v1/chat/completions does. Needed for Instruct models.",
)
@click.option("--system", default=None, help="With --chat: a system message before PROMPT.")
@click.argument("prompt", required=False)
def generate(
    broker: str,
    model: str,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    input_ids_text: str | None,
    as_json: bool,
    timeout: float | None,
    keys_dir: Path | None,
    chat: bool,
    system: str | None,
    prompt: str | None,
) -> None:
    """Generate from PROMPT (or stdin, or --input-ids); stream the text as it comes.

    With --json, print only {"token_ids": [...], "text": "...", "finish_reason": "..."} at the
    end.
    """
    input_ids = parse_ids(input_ids_text)
    if (chat or system is not None) and input_ids is not None:
        raise click.UsageError("--chat takes PROMPT (a user message), not --input-ids")
    if system is not None and not chat:
        raise click.UsageError("--system needs --chat")
    prompt = read_prompt(prompt, input_ids)
    if chat:
        assert prompt is not None  # read_prompt returns text when no ids were given
        input_ids, prompt = chat_ids(broker, keys_dir, model, prompt, system, timeout), None
    write: Callable[[str], None] = _no_write if as_json else _write_flush
    ids: list[int] = []
    texts: list[str] = []
    finish_reason = ""
    try:
        with cli_errors(), Client(broker, keys_dir=keys_dir) as client:
            params = GenerateParams(max_tokens, temperature, top_k, top_p, seed, timeout)
            events = client.stream(model, prompt=prompt, input_ids=input_ids, params=params)
            for ev in events:
                ids.append(ev.token_id)
                texts.append(ev.text)
                finish_reason = ev.finish_reason or finish_reason
                write(ev.text)
    finally:
        if texts and not as_json:
            click.echo("")  # end the streamed line, also before an error on stderr
    if as_json:
        echo_json({"token_ids": ids, "text": "".join(texts), "finish_reason": finish_reason})


def chat_ids(
    broker: str,
    keys_dir: Path | None,
    model: str,
    prompt: str,
    system: str | None,
    timeout: float | None,
) -> list[int]:
    """The prompt ids of PROMPT as a user message under the model's chat template."""
    import asyncio

    from blockllm.client.chat_template import ChatTemplateError, fetch_chat_ids

    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    try:
        with cli_errors():
            return asyncio.run(fetch_chat_ids(broker, keys_dir, model, messages, timeout or 60.0))
    except ChatTemplateError as e:
        raise CliError(f"{e} (drop --chat to send PROMPT as it is)", EXIT_BAD_REQUEST) from None


def _no_write(_text: str) -> None:
    pass


def _write_flush(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


@click.command()
@broker_option
@json_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds to wait for the broker's answer.",
)
@click.option("--model", default="", help="Only this model and the workers serving it.")
@click.option("--worker", default="", help="Only this worker and the models it serves.")
@keys_option
def status(
    broker: str, as_json: bool, timeout: float, model: str, worker: str, keys_dir: Path | None
) -> None:
    """Workers (pid, host, stages, queues, KV use, memory) and models with their routes.

    Exits non-zero (a health check) when the broker does not answer within --timeout, or when a
    model is not covered by workers.
    """
    with cli_errors(), Client(broker, keys_dir=keys_dir) as client:
        body = client.status(timeout=timeout, model=model, worker=worker)
    if model and model not in body.get("models", {}):
        raise CliError(f"unknown model {model!r} (or no worker filter matches it)")
    if worker and not any(w.get("name") == worker for w in body.get("workers", ())):
        raise CliError(f"no worker {worker!r}")
    if as_json:
        echo_json(body)
    else:
        click.echo(render_status(broker, body))
    uncovered = require_covered(body, None)
    if uncovered:
        models = body.get("models", {})
        why = [
            f"{m} ({models[m]['uncovered']})" if models[m].get("uncovered") else m
            for m in uncovered
        ]
        raise CliError(f"models not covered by workers: {few(why, sep='; ')}", EXIT_FAILED)


# ---- the readable table ---------------------------------------------------------------------


def _mib(n: Any) -> str:
    return f"{n / (1 << 20):.0f}M" if isinstance(n, (int, float)) else "-"


def _stage_text(st: Any) -> str:
    if isinstance(st, dict):
        span = f"[{st.get('start', '?')},{st.get('end', '?')})"
        return f"{st.get('model', st.get('key', '?'))}{span}"
    return str(st)


def _worker_row(w: dict[str, Any]) -> list[str]:
    queues = w.get("queue_depths", {})
    queued = sum(queues.values()) if isinstance(queues, dict) else queues
    kv_total, kv_free = w.get("kv_total_bytes"), w.get("kv_free_bytes")
    kv = (
        f"{_mib(kv_total - kv_free)}/{_mib(kv_total)}"
        if isinstance(kv_total, int) and isinstance(kv_free, int)
        else "-"
    )
    p50 = w.get("step_ms_p50")
    return [
        str(w.get("name", "-")),
        str(w.get("pid", "-")),
        str(w.get("host", "-")),
        str(w.get("device", "-")),
        str(queued if queued is not None else "-"),
        kv,
        _mib(w.get("rss_bytes")),
        f"{p50:.1f}" if isinstance(p50, (int, float)) else "-",
        " ".join(_stage_text(s) for s in w.get("stages", ())) or "-",
    ]


def _route_text(route: Any) -> str:
    """[[worker, [[start, end], ...]], ...] -> "w0[0,16) -> w1[16,32)"."""
    if not isinstance(route, list) or not route:
        return "-"
    hops = []
    for hop in route:
        if isinstance(hop, list) and len(hop) == 2 and isinstance(hop[1], list):
            spans = "+".join(
                f"[{sp[0]},{sp[1]})" for sp in hop[1] if isinstance(sp, list) and len(sp) == 2
            )
            hops.append(f"{hop[0]}{spans}")
        else:
            hops.append(str(hop))
    return " -> ".join(hops)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]


def _chain_text(subs: Any) -> str:
    """The chain a model is really served with: "own", or its substituted layers, e.g.
    "L2<-base L3<-base" (decoder layer i is chain position i + 1)."""
    if not isinstance(subs, list) or not subs:
        return "own"
    parts = []
    for sub in subs:
        if isinstance(sub, dict) and isinstance(sub.get("position"), int):
            parts.append(f"L{sub['position'] - 1}<-{sub.get('from') or sub.get('block', '?')[:8]}")
    return " ".join(parts) or "own"


def _model_row(name: str, m: Any) -> list[str]:
    m = m if isinstance(m, dict) else {}
    return [
        str(name),
        "yes" if m.get("covered") else "NO",
        str(m.get("running", "-")),
        str(m.get("waiting", "-")),
        _chain_text(m.get("substitutions")),
        _route_text(m.get("route")),
    ]


def render_status(broker: str, body: dict[str, Any]) -> str:
    """The STATUS body as two tables (fields a broker does not send are shown as '-')."""
    workers = [w for w in body.get("workers", []) if isinstance(w, dict)]
    models = body.get("models", {})
    models = models if isinstance(models, dict) else {}
    lines = [f"broker {broker}: {len(workers)} workers, {len(models)} models"]
    requests = body.get("requests")
    if isinstance(requests, dict):
        running, waiting = requests.get("running"), requests.get("waiting")
        lines[0] += f", requests running {running} waiting {waiting}"
    header = ["WORKER", "PID", "HOST", "DEVICE", "QUEUED", "KV USED", "RSS", "STEP MS", "STAGES"]
    lines += ["", *_table(header, [_worker_row(w) for w in workers])]
    rows = [_model_row(name, m) for name, m in models.items()]
    lines += ["", *_table(["MODEL", "COVERED", "RUNNING", "WAITING", "CHAIN", "ROUTE"], rows)]
    why = [
        f"  {name}: {m['uncovered']}"
        for name, m in models.items()
        if isinstance(m, dict) and not m.get("covered") and m.get("uncovered")
    ]
    if why:
        lines += ["", "not covered:", *why]
    counters = body.get("counters")
    if isinstance(counters, dict) and any(counters.values()):
        lines += ["", "counters: " + " ".join(f"{k}={v}" for k, v in counters.items() if v)]
    return "\n".join(lines)


commands = [generate, status]
