"""An evaluation harness run end to end as a user would: `lm-eval` (its CLI) with
`local-completions` against the HTTP API (echo + logprobs scoring), and with `hf` against the
same checkpoint loaded by transformers; the scores, and each answer's log-likelihood, must be
equal (fp32). The task is local (tests/data/lmeval): nothing is downloaded. The HF run goes
in the background first, beside the cluster's start-up and the HTTP run.

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


class LmEval:
    """The lm-eval CLI run from the task folder, started at once in the background (the HF
    pass runs beside the cluster's start-up and the HTTP pass); `result()` waits for it."""

    def __init__(self, model: str, model_args: str, out: Path, tmp: Path) -> None:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp / f"datasets-{out.name}"),  # one each: side by side
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
        self.out = out
        self.log = tmp / f"{out.name}.stderr"  # a file: a pipe nobody reads could fill up
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=DATA, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True
            )

    def result(self, timeout: float = 900) -> tuple[dict, list[dict]]:
        """(its results, its logged samples, by doc_id) once it exited 0."""
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(30)
        assert rc == 0, self.log.read_text()[-4000:]
        (results,) = self.out.rglob("results_*.json")
        (samples,) = self.out.rglob(f"samples_{TASK}_*.jsonl")
        docs = [json.loads(line) for line in samples.read_text().splitlines()]
        by_id = sorted(docs, key=lambda d: d["doc_id"])
        return json.loads(results.read_text())["results"][TASK], by_id


def loglikelihoods(doc: dict[str, Any]) -> list[float]:
    return [float(r[0][0]) for r in doc["resps"]]


def test_lm_eval_scores_through_http_equal_hf(tiny_checkpoint, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint("llama")
    hf_run = LmEval("hf", f"pretrained={ckpt},dtype=float32", tmp_path / "hf", tmp_path)
    try:
        zoo = make_zoo(tmp_path / "zoo", {"base": ckpt})
        # one worker: the scores through HTTP are the point here; echo logprobs over a split
        # chain are test_http_api's (a second worker cost ~20 CPU-s: start-up, a hop a forward)
        with cluster(zoo, {"w0": ["base:0-6"]}, ["base"]) as c:
            url = c.launcher.start_http(HttpConfig(broker=c.endpoint, port=0), 60)
            args = (
                f"model=base,base_url={url}/completions,tokenizer={ckpt},"
                "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,"
                "max_retries=1,timeout=120"
            )
            http_run = LmEval("local-completions", args, tmp_path / "http", tmp_path)
            served, served_docs = http_run.result()
        hf, hf_docs = hf_run.result()
    finally:
        if hf_run.proc.poll() is None:
            hf_run.proc.kill()
            hf_run.proc.wait(30)
    assert len(served_docs) == len(hf_docs) == 12
    for a, b in zip(served_docs, hf_docs, strict=True):
        assert loglikelihoods(a) == pytest.approx(loglikelihoods(b), abs=1e-4), a["doc_id"]
    for metric in ("acc,none", "acc_norm,none"):
        assert served[metric] == hf[metric], (metric, served, hf)
