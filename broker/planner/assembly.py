"""Adaptive chain assembly: serve a model through equivalent blocks within its tolerance.

`zoo equiv` stores, for pairs of different blocks at the same position of one family, how much
the model's next-token distribution moves when one replaces the other (KL, nats). A model
with a tolerance `t > 0` may then be served with some of its decoder layers replaced by other
models' blocks at those positions: the planner picks, by ascending KL, one substitute per
position while the summed KL stays within `t` (a conservative budget: each record measures one
substitution alone). A substitute must be a block another served model of the same family has
at that position, so a stage of that model can host it, and is shared with that model. The
embedding and the head are never substituted. Tolerance 0 (the default) is the exact chain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blockllm.broker.planner.planner import Planner


def candidates(
    model: str, manifests: dict[str, Any], equivalences: list[Any]
) -> dict[int, tuple[float, str]]:
    """Per decoder position of `model`: (KL, substitute block) of its closest equivalent that
    another model of its family has there."""
    m = manifests[model]
    chain = tuple(m.chain)
    others = {
        (p, b)
        for name, o in manifests.items()
        if name != model and o.fingerprint == m.fingerprint and len(o.chain) == len(chain)
        for p, b in enumerate(o.chain)
    }
    best: dict[int, tuple[float, str]] = {}
    for rec in equivalences:
        p = rec.position
        if not 1 <= p <= len(chain) - 2 or rec.original != chain[p]:
            continue
        if rec.substitute == chain[p] or (p, rec.substitute) not in others:
            continue
        if rec.fingerprint and rec.fingerprint != m.fingerprint:
            continue
        if p not in best or rec.kl < best[p][0]:
            best[p] = (float(rec.kl), rec.substitute)
    return best


def assemble(planner: Planner, model: str) -> tuple[str, ...]:
    """The chain `model` is served with under its tolerance (its own chain when 0)."""
    own = tuple(planner.manifests[model].chain)
    budget = dict(planner.cfg.tolerance).get(model, 0.0)
    if budget <= 0:
        return own
    chain = list(own)
    spent = 0.0
    for p, (kl, block) in sorted(
        candidates(model, planner.manifests, planner.equivalences).items(),
        key=lambda item: (item[1][0], item[0]),
    ):
        if spent + kl > budget:
            break
        chain[p] = block
        spent += kl
    return tuple(chain)
