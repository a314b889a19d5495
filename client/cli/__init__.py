"""The `blockllm` command line: a thin click group; each command family lives in its own module.

Commands parse flags into a config and call into the library; errors become one line on stderr
and a non-zero exit code.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from blockllm.client.cli.common import CliError

# Long-running processes started on their own (by hand or by a unit): their lifecycle lines
# ("[ready] broker listening on ADDR", the planner's placements, a worker's loads) are INFO and
# are what an operator starting them watches for, so they log at INFO unless told otherwise.
DAEMONS = frozenset({"broker", "worker", "planner", "http"})


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="More logging (-v info, -vv debug). broker, worker, planner and http log at info "
    "already; $BLOCKLLM_LOG_LEVEL overrides both.",
)
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """BlockLLM: serve many fine-tuned variants of one LLM from shared blocks."""
    quiet = "INFO" if ctx.invoked_subcommand in DAEMONS else "WARNING"
    level = os.environ.get("BLOCKLLM_LOG_LEVEL") or (
        "DEBUG" if verbose >= 2 else "INFO" if verbose == 1 else quiet
    )
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _register() -> None:
    """Attach each command family; a family whose module is missing is simply absent."""
    import importlib

    for module, attr in (
        ("blockllm.client.cli.zoo", "zoo"),
        ("blockllm.client.cli.models", "models"),
        ("blockllm.client.cli.bench", "bench"),
        ("blockllm.client.cli.serve", "commands"),
        ("blockllm.client.cli.generate", "commands"),
        ("blockllm.client.cli.keys", "keys"),
        ("blockllm.client.cli.planner", "commands"),
        ("blockllm.client.cli.demo", "demo"),
        ("blockllm.client.cli.http_api", "commands"),
        ("blockllm.client.cli.doctor", "doctor"),
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        obj = getattr(mod, attr)
        for cmd in obj if isinstance(obj, (list, tuple)) else [obj]:
            cli.add_command(cmd)


_register()


def main() -> None:
    """Console-script entry point: one-line errors, honest exit codes."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except CliError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
