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
    buffer per group); ``weight[r] = Σ_{i: r_i = r} p_i``. The buffers are the strategy's, reused
    by the next round's sums: a rule copies what it keeps (every built-in rule writes new tensors).
    """

    weight: dict[int, float]
    by_key: dict[int, dict[str, list[Tensor]]]
    bufs: dict[int, Tensor]


def group_sums(updates: list[ClientUpdate], p: list[float], validator: UpdateValidator,
               dtype: torch.dtype, pool: dict[int, Tensor] | None = None) -> GroupSums:
    """Each rank group's weighted sum in one flat buffer (a flat update is one ``add_``, any
    other one multi-tensor add over its layers). ``pool``: buffers kept from an earlier round,
    reused when their size fits (a fresh large buffer costs a page fault per 4 KiB on first touch)."""
    pool = {} if pool is None else pool
    bufs: dict[int, Tensor] = {}
    views: dict[int, list[Tensor]] = {}
    weight: dict[int, float] = {}
    for u, pi in zip(updates, p):
        r = u.rank
        layout = validator.layout(r)
        first = r not in bufs
        if first:
            sizes = [math.prod(s) for _, _, s in layout]
            buf = pool.get(r)
            if buf is None or buf.numel() != sum(sizes) or buf.dtype != dtype:
                buf = pool[r] = torch.empty(sum(sizes), dtype=dtype)
            bufs[r] = buf
            views[r] = [v.view(s) for v, (_, _, s) in zip(torch.split(buf, sizes), layout)]
            weight[r] = 0.0
        if u.flat is not None:
            if first:  # the group's first member overwrites: no zeroing pass
                torch.mul(u.flat, pi, out=bufs[r])
            else:
                bufs[r].add_(u.flat, alpha=pi)
        else:
            if first:
                bufs[r].zero_()
            torch._foreach_add_(views[r], [u.factors[n][k] for n, k, _ in layout], alpha=pi)
        weight[r] += pi
    keys = validator.keys
    by_key = {r: {k: vs[j::len(keys)] for j, k in enumerate(keys)} for r, vs in views.items()}
    return GroupSums(weight, by_key, bufs)
