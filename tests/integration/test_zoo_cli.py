"""`blockllm zoo ...` through click's CliRunner, plus real subprocesses for exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from blockllm.client.cli import cli
from blockllm.client.cli.common import CliError
from blockllm.zoo import Zoo
from blockllm.zoo.families import SUPPORTED_MODEL_TYPES
from tests.unit.test_zoo_support import finetune, read_tensors


@pytest.fixture
def run(tmp_path):
    """run("ls", "--json") -> click Result, against a zoo under tmp_path."""
    runner = CliRunner()
    root = str(tmp_path / "zoo")

    def invoke(*args: str):
        return runner.invoke(cli, ["zoo", *args, "--zoo", root])

    invoke.root = root
    return invoke


def _ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_import_ls_du_verify_export_rm_gc(run, tmp_path, tiny_checkpoint):
    src = tiny_checkpoint("llama", layers=6)
    ft = finetune(src, tmp_path / "ft", {2: 1e-3, 3: 1e-1})
    res = _ok(run("import", str(src), "--name", "base"))
    assert "imported base: llama float32, 6 layers" in res.stdout
    assert "[import base] block 8/8" in res.stderr
    res = _ok(run("import", str(ft), "--name", "ft", "--json"))
    info = json.loads(res.stdout)
    assert res.stderr == "" and info["layers"] == 6
    assert 0 < info["added_bytes"] < info["logical_bytes"] / 3  # only the 2 tuned layers

    usage = json.loads(_ok(run("du", "--json")).stdout)
    assert {"logical_bytes", "physical_bytes", "blocks", "shared_blocks", "models"} <= set(usage)
    assert (usage["blocks"], usage["shared_blocks"]) == (10, 6)
    assert set(usage["models"]["ft"]) >= {"logical_bytes", "unique_bytes"}
    assert "dedup saves" in _ok(run("du")).stdout

    equiv = json.loads(_ok(run("equiv", "--json", "--prompts", "2", "--seq-len", "8")).stdout)
    assert len(equiv["measured"]) == 4 and equiv["skipped"] == 0
    assert "skipped 4 already measured" in _ok(run("equiv")).stdout
    listing = json.loads(_ok(run("ls", "--json")).stdout)
    assert len(listing["base"]["equivalence"]) == 2 and listing["base"]["layers"] == 6
    table = _ok(run("ls")).stdout
    assert table.splitlines()[0].split() == [
        "NAME",
        "TYPE",
        "LAYERS",
        "DTYPE",
        "BYTES",
        "UNIQUE",
        "EQUIV",
    ]
    assert "best kl" in table

    report = json.loads(_ok(run("verify", "--json")).stdout)
    assert report["ok"] and report["blocks_checked"] == 10
    out = tmp_path / "out"
    _ok(run("export", "ft", str(out)))
    want, got = read_tensors(ft), read_tensors(out)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)

    _ok(run("rm", "ft"))
    gc = json.loads(_ok(run("gc", "--json")).stdout)
    assert gc["removed_blocks"] == 2 and gc["removed_equivalence"] == 4
    assert list(json.loads(_ok(run("ls", "--json")).stdout)) == ["base"]


def test_verify_names_bad_block_and_models(run, tiny_checkpoint):
    _ok(run("import", str(tiny_checkpoint("qwen2")), "--name", "q"))
    m = Zoo(run.root).manifest("q")
    path = Zoo(run.root).block_path(m.chain[1])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))
    res = run("verify")
    assert res.exit_code != 0 and isinstance(res.exception, CliError)
    assert f"BAD block {m.chain[1]}" in res.stdout and "used by: q" in res.stdout
    assert m.chain[1] in str(res.exception) and "q" in str(res.exception)


def test_errors_are_cli_errors(run, tmp_path, tiny_checkpoint):
    res = run("import", str(tmp_path / "missing"), "--name", "x")
    assert isinstance(res.exception, CliError) and "not found" in str(res.exception)
    res = run("import", str(tiny_checkpoint("llama")), "--name", "bad name")
    assert isinstance(res.exception, CliError) and "invalid model name" in str(res.exception)
    _ok(run("import", str(tiny_checkpoint("llama")), "--name", "m"))
    res = run("import", str(tiny_checkpoint("llama")), "--name", "m")
    assert isinstance(res.exception, CliError) and "--force" in str(res.exception)
    _ok(run("import", str(tiny_checkpoint("qwen2")), "--name", "m", "--force"))
    for args in (("rm", "nope"), ("export", "nope", str(tmp_path / "o"))):
        res = run(*args)
        assert isinstance(res.exception, CliError) and "unknown model 'nope'" in str(res.exception)


def test_real_subprocess_exit_codes(tmp_path, tiny_checkpoint):
    base = [sys.executable, "-m", "blockllm.client.cli", "zoo"]
    zoo = ["--zoo", str(tmp_path / "zoo")]

    def sh(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *args, *zoo], capture_output=True, text=True, timeout=120)

    ok = sh("import", str(tiny_checkpoint("mistral")), "--name", "mis")
    assert ok.returncode == 0 and "imported mis" in ok.stdout, ok.stderr
    neox = tmp_path / "neox"
    neox.mkdir()
    (neox / "config.json").write_text(
        json.dumps({"model_type": "gpt_neox", "num_hidden_layers": 1})
    )
    bad = sh("import", str(neox), "--name", "g")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: model_type 'gpt_neox' is not supported: no declared difference set for it"
        f" (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    )
    assert json.loads(sh("du", "--json").stdout)["blocks"] == 6
    gone = sh("rm", "nope")
    assert gone.returncode == 1 and gone.stderr.strip() == "error: unknown model 'nope'"
    helped = subprocess.run([*base, "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "equiv" in helped.stdout


@pytest.mark.parametrize("cmd", ["import", "ls", "du", "verify", "export", "rm", "gc", "equiv"])
def test_every_command_has_help(cmd):
    res = CliRunner().invoke(cli, ["zoo", cmd, "--help"])
    assert res.exit_code == 0 and "Usage:" in res.stdout and "--zoo" in res.stdout
