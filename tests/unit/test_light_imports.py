"""A text-in/text-out client, the CLI's help and the broker's envelope path never import torch,
nor the HTTP server's stack (checked in a fresh interpreter through `sys.modules`)."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import sys
{body}
heavy = ("torch", "transformers", "safetensors", "fastapi", "starlette", "uvicorn")
heavy = sorted(m for m in heavy if m in sys.modules)
print(",".join(heavy) or "light")
"""


def _probe(body: str) -> str:
    code = PROBE.format(body=body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_importing_the_client_does_not_import_torch() -> None:
    body = """
import blockllm.client, blockllm.client.http
from blockllm.client import AsyncClient, Client, GenerateParams
from blockllm.client.http import HttpConfig
"""
    assert _probe(body) == "light"


def test_cli_help_does_not_import_torch() -> None:
    body = """
from blockllm.client.cli import cli
for args in (["serve", "--help"], ["demo", "--help"], ["generate", "--help"], ["http", "--help"],
             ["bench", "http", "--help"], ["keys", "api-add", "--help"]):
    try:
        cli.main(args, standalone_mode=False)
    except SystemExit:
        pass
"""
    assert _probe(body) == "light"


def test_broker_envelope_path_does_not_import_torch() -> None:
    body = """
from blockllm.broker import frames
from blockllm.broker.protocol import Result, TensorMeta
meta = TensorMeta("bfloat16", (2, 3))
wire = frames.encode_passthrough(Result("r", 1, tensors=(meta,)), [b"x" * 12])
msg = frames.decode_header(wire)
assert frames.tensor_nbytes(msg.tensors[0]) == 12
import blockllm.broker.proc, blockllm.broker.planner.proc
"""
    assert _probe(body) == "light"


def test_planner_reading_a_catalog_does_not_import_torch() -> None:
    """The planner's first snapshot parses the broker's catalog: importing torch there took
    1.4 CPU-s (2.8 s under load) before its first placement."""
    body = """
import json
from blockllm.broker.planner.catalog import parse_catalog
record = {"original": "a" * 64, "substitute": "b" * 64, "position": 1, "fingerprint": "f",
          "host_model": "m", "rel_error": 0.1, "kl": 0.01, "agreement": 0.9, "prompts": 4,
          "seq_len": 16, "calibration": "random", "seed": 0, "measured_at": "now"}
_, records = parse_catalog(json.dumps({"models": {}, "equivalence": [record]}).encode())
assert records[0].kl == 0.01
"""
    assert _probe(body) == "light"
