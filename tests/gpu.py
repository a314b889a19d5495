"""`python -m tests.gpu`: the device checks, in one command, for a machine with CUDA.

Where CUDA is present it runs, each as a subprocess with a time limit:
1. the parity tests on the device (`-k cuda`: greedy through the block pipeline on CUDA equals
   HF transformers `generate`, token for token; the pinned, non-blocking frames of
   worker/transfer.py);
2. `blockllm bench pipeline --quick --device cuda --json` (the machinery, a tiny model);
3. `blockllm bench multitenant --quick --device cuda --json` (every system on the device);
and prints ONE JSON summary on stdout: {"cuda": true, "device": name, "checks": {name: {"ok",
"rc", "seconds", and the benchmark's headline numbers or the output's tail}}, "ok": all ok}.
Exit code 0 when every check passed.

Without CUDA it prints {"cuda": false, "skipped": "..."} and exits 0 (nothing to check here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

LIMIT_S = 240  # per check


def _run(args: list[str], limit: float = LIMIT_S) -> tuple[int, str, str, float]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    t = time.monotonic()
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=limit, env=env)
        return p.returncode, p.stdout, p.stderr, time.monotonic() - t
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        return 124, out, f"timed out after {limit} s", time.monotonic() - t


def _check(args: list[str], headline: Any = None) -> dict[str, Any]:
    rc, out, err, seconds = _run(args)
    res: dict[str, Any] = {"ok": rc == 0, "rc": rc, "seconds": round(seconds, 1)}
    if rc == 0 and headline is not None:
        try:
            res.update(headline(json.loads(out)))
        except (ValueError, KeyError, TypeError) as e:
            res.update(ok=False, error=f"unreadable output: {e}")
    if not res["ok"]:
        res["tail"] = (out + err)[-2000:]
    return res


def _pipeline(doc: dict[str, Any]) -> dict[str, Any]:
    return {"results": doc["results"], "concurrency_speedup": doc["concurrency_speedup"]}


def _multitenant(doc: dict[str, Any]) -> dict[str, Any]:
    rows = {k: v for k, v in doc.items() if k != "meta"}
    return {
        "tokens_per_s": {k: v["tokens_per_s"] for k, v in rows.items()},
        "errors": {k: v["errors"] for k, v in rows.items()},
        "goals": doc["meta"]["goals"],
    }


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "skipped": "no CUDA device here: nothing was run"}))
        return 0
    cli = [sys.executable, "-m", "blockllm.client.cli"]
    checks = {
        "parity": _check(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-x",
                "-k",
                "cuda",
                "-p",
                "no:cacheprovider",
                "tests/integration/test_engine_parity.py",
                "tests/unit/test_transfer.py",
            ]
        ),
        "bench_pipeline": _check(
            [
                *cli,
                "bench",
                "pipeline",
                "--quick",
                "--device",
                "cuda",
                "--streams",
                "1,16",
                "--new-tokens",
                "16",
                "--json",
            ],
            _pipeline,
        ),
        "bench_multitenant": _check(
            [
                *cli,
                "bench",
                "multitenant",
                "--quick",
                "--device",
                "cuda",
                "--tenants",
                "2",
                "--requests",
                "16",
                "--baseline-threads",
                "1",
                "--json",
            ],
            _multitenant,
        ),
    }
    summary = {
        "cuda": True,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
    }
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
