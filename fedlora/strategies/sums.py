"""The weighted sums most rules start from: one flat buffer per rank group, one pass."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedlora.strategies.types import ClientUpdate
from fedlora.strategies.validation import UpdateValidator

Tensor = torch.Tensor


@dataclass
class GroupSums:
    """``Σ_{i: r_i = r} p_i·X_i`` per rank group ``r`` for every uploaded factor, in one pass.

    ``by_key[r][key]`` lists the per-layer sums in layer order (views into ``bufs[r]``, one flat
    buffer per group); ``weight[r] = Σ_{i: r_i = r} p_i``.
    """

    weight: dict[int, float]
    by_key: dict[int, dict[str, list[Tensor]]]
    bufs: dict[int, Tensor]


def group_sums(updates: list[ClientUpdate], p: list[float], validator: UpdateValidator,
               dtype: torch.dtype) -> GroupSums:
    """Each rank group's weighted sum in one flat buffer (a flat update is one ``add_``, any
    other one multi-tensor add over its layers)."""
    bufs: dict[int, Tensor] = {}
    views: dict[int, list[Tensor]] = {}
    weight: dict[int, float] = {}
    for u, pi in zip(updates, p):
        r = u.rank
        layout = validator.layout(r)
        if r not in bufs:
            sizes = [math.prod(s) for _, _, s in layout]
            bufs[r] = torch.zeros(sum(sizes), dtype=dtype)
            views[r] = [v.view(s) for v, (_, _, s) in zip(torch.split(bufs[r], sizes), layout)]
            weight[r] = 0.0
        if u.flat is not None:
            bufs[r].add_(u.flat, alpha=pi)
        else:
            torch._foreach_add_(views[r], [u.factors[n][k] for n, k, _ in layout], alpha=pi)
        weight[r] += pi
    keys = validator.keys
    by_key = {r: {k: vs[j::len(keys)] for j, k in enumerate(keys)} for r, vs in views.items()}
    return GroupSums(weight, by_key, bufs)
