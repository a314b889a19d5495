"""`bench speculative` end to end on the tiny random Llama family (one cut, two tolerances)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from blockllm.client.cli import cli


def test_bench_speculative_quick_json(tmp_path: Path) -> None:
    import json

    args = ["bench", "speculative", "--quick", "--json", "--prompts", "1", "--new-tokens", "4"]
    args += ["--tolerances", "0,1e9", "--cuts", "4-5-6", "--cache-dir", str(tmp_path)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["bench"] == "speculative" and len(doc["load_average"]) == 2
    assert [r["model"] for r in doc["results"]] == ["tiny", "tiny-full1"]
    for row in doc["results"]:
        assert row["cut"] == [4, 5, 6] and row["decode_steps"] == 3
        exact, always = row["tolerances"]
        # tolerance 0 keeps no guess (random layers move the residual stream): exact tokens
        assert exact["acceptance"] == 0.0 and exact["rejected"] == 3
        assert exact["token_agreement"] == 1.0 and exact["sequences_identical"] == 1
        assert always["acceptance"] == 1.0 and always["accepted"] == 3


def test_bench_speculative_rejects_a_bad_cut(tmp_path: Path) -> None:
    args = ["bench", "speculative", "--quick", "--cuts", "5-4-6", "--cache-dir", str(tmp_path)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0 and "need 1 <= a < b < c" in str(res.exception)
