"""`python -m tests.gpu` on a machine without CUDA: one JSON line saying it skipped, exit 0
(the device checks themselves run where a GPU is lent), and the engine's clock settles CUDA
work only (nothing to wait for on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_script_skips_cleanly_without_cuda() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device, even on a GPU machine
    proc = subprocess.run(
        [sys.executable, "-m", "tests.gpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    doc = json.loads(lines[0])
    assert doc["cuda"] is False and "skipped" in doc


def test_settle_is_a_no_op_on_cpu_tensors() -> None:
    from blockllm.worker.forward import settle

    settle(torch.zeros(3))  # returns at once: no CUDA call on a CPU tensor
