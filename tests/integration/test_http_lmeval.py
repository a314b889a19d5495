"""An evaluation harness run end to end as a user would: `lm-eval` (its CLI) with
`local-completions` against the HTTP API (echo + logprobs scoring), and with `hf` against the
same checkpoint loaded by transformers; the scores, and each answer's log-likelihood, must be
equal (fp32). The task is local (tests/data/lmeval): nothing is downloaded.

lm-eval is an optional extra (`pip install -e ".[eval]"`: its dependencies take minutes to
install), so the test is skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blockllm.client.http.config import HttpConfig
from tests.integration.cluster import cluster, make_zoo

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

DATA = Path(__file__).resolve().parents[1] / "data" / "lmeval"
TASK = "blockllm_tiny_mc"


def lm_eval(model: str, model_args: str, out: Path, tmp: Path) -> tuple[dict, list[dict]]:
    """Run the lm-eval CLI from the task folder; (its results, its logged samples)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp / "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        TASK,
        "--include_path",
        ".",
        "--batch_size",
        "1",
        "--output_path",
        str(out),
        "--log_samples",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, cwd=DATA, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results,) = out.rglob("results_*.json")
    (samples,) = out.rglob(f"samples_{TASK}_*.jsonl")
    docs = [json.loads(line) for line in samples.read_text().splitlines()]
    return json.loads(results.read_text())["results"][TASK], sorted(docs, key=lambda d: d["doc_id"])


def loglikelihoods(doc: dict[str, Any]) -> list[float]:
    return [float(r[0][0]) for r in doc["resps"]]


def test_lm_eval_scores_through_http_equal_hf(tiny_checkpoint, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint("llama")
    zoo = make_zoo(tmp_path / "zoo", {"base": ckpt})
    with cluster(zoo, {"w0": ["base:0-3"], "w1": ["base:3-6"]}, ["base"]) as c:
        url = c.launcher.start_http(HttpConfig(broker=c.endpoint, port=0), 60)
        args = (
            f"model=base,base_url={url}/completions,tokenizer={ckpt},"
            "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,"
            "max_retries=1,timeout=120"
        )
        served, served_docs = lm_eval("local-completions", args, tmp_path / "http", tmp_path)
    hf, hf_docs = lm_eval("hf", f"pretrained={ckpt},dtype=float32", tmp_path / "hf", tmp_path)
    assert len(served_docs) == len(hf_docs) == 12
    for a, b in zip(served_docs, hf_docs, strict=True):
        assert loglikelihoods(a) == pytest.approx(loglikelihoods(b), abs=1e-4), a["doc_id"]
    for metric in ("acc,none", "acc_norm,none"):
        assert served[metric] == hf[metric], (metric, served, hf)
