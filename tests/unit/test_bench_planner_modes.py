"""`bench multitenant --planner MODES`: the option's parsing and the per-mode table."""

from __future__ import annotations

import click
import pytest

from blockllm.client.bench.multitenant_report import planner_table
from blockllm.client.cli.bench_multitenant import _planner_modes


def summary(p95: float, commands: int) -> dict:
    return {
        "p50_ms": p95 / 2,
        "p95_ms": p95,
        "p99_ms": p95,
        "ttft_p95_ms": 10.0,
        "tokens_per_s": 50.0,
        "resident_bytes": 3 << 20,
        "errors": 0,
        "requests": 4,
        "counters": {"commands": commands, "moved": 1, "replays": 0},
        "load_average": [1.5, 1.0, 0.5],
    }


def test_modes_parse_in_order_and_bad_ones_are_refused() -> None:
    assert _planner_modes(None, None, "off, dups") == ("off", "dups")
    for bad in ("", "fast", "off,off"):
        with pytest.raises(click.BadParameter):
            _planner_modes(None, None, bad)


def test_the_table_has_a_row_per_mode_only_when_more_than_static_ran() -> None:
    assert planner_table({"meta": {"planner_modes": {"off": summary(100, 0)}}}) == []
    doc = {
        "meta": {
            "straggler_delay_s": 0.1,
            "planner_modes": {"off": summary(100, 0), "dups": summary(80, 7)},
        }
    }
    lines = planner_table(doc)
    assert "slowed by 0.1 s" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[4:]}
    assert list(rows) == ["off", "dups"]
    assert rows["dups"][2] == "80" and rows["dups"][8] == "7" and rows["dups"][-1] == "1.50"
