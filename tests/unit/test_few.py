"""`few`: what log lines and errors name out of thousands of tenants."""

from __future__ import annotations

from blockllm.broker.ratelog import few


def test_few_names_at_most_n_then_counts_the_rest() -> None:
    names = [f"t{i:04d}" for i in range(2001)]
    line = few(names)
    assert line == "t0000, t0001, t0002, t0003, t0004, t0005, t0006, t0007, (and 1993 more)"
    assert few(names[:8]) == ", ".join(names[:8])  # no tail when nothing is left out
    assert few(iter(["a", "b", "c"]), n=2, sep="; ") == "a; b; (and 1 more)"
    assert few([]) == ""
