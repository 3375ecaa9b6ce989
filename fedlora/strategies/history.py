"""The versioned frozen base shared by the exact strategies that fold into ``W0``.

``cum[layer] = base_g − W0`` (dense, server dtype) and a bounded window of per-version deltas, so a
client holding version ``v`` (``0``: ``W0`` itself) receives exactly the deltas it missed
(``v+1 … cur``), or one dense ``reset`` delta (the full ``base_g − W0``) when that is fewer numbers
or ``v`` left the window.

A round's delta arrives factored (``U·V``) and is folded in place, ``cum += U·V``, in one pass
over the dense matrix — after a check that no layer can overflow: ``bound[layer] ≥ max|cum|`` is
kept, and ``max|U·V| ≤ ‖U‖_F‖V‖_F``, so a round whose bounds stay below half the dtype's largest
number cannot write ∞ (checked from the factors, no dense pass). Only a round beyond that (a long
attack of large in-range updates) forms the dense sums to look, and is rejected whole if one is
not finite.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedlora.strategies.defences import NonFiniteAggregate, overflow_reason
from fedlora.strategies.deltas import Delta, Dense, cheapest, from_tensors
from fedlora.strategies.types import BaseDelta, LayerSpec

Tensor = torch.Tensor


class BaseHistory:
    def __init__(self, layers: dict[str, LayerSpec], dtype: torch.dtype, window: int) -> None:
        self.layers = layers
        self.dtype = dtype
        self.window = window
        self.cum: dict[str, Tensor] = {n: torch.zeros(s.d_out, s.d_in, dtype=dtype)
                                       for n, s in layers.items()}
        self.deltas: dict[int, dict[str, Delta]] = {}
        self.bound: dict[str, float] = {n: 0.0 for n in layers}  # ≥ max|cum[n]|

    def fold(self, version: int, factors: dict[str, tuple[Tensor, Tensor]], what: str) -> None:
        """``base_g(version) = base_g(version−1) + U·V`` for every layer, or ``NonFiniteAggregate``
        (``what`` names the product) before anything changes. The delta is kept for the clients
        as factors when ``ρ(d+k) < d·k`` numbers, else dense."""
        limit = torch.finfo(self.dtype).max / 2
        grow = {n: float(U.norm()) * float(V.norm()) for n, (U, V) in factors.items()}
        safe = all(self.bound[n] + g <= limit for n, g in grow.items())  # (False for NaN / ∞)
        transport: dict[str, Delta] = {}
        dense: dict[str, Tensor] = {}
        for n, (U, V) in factors.items():
            transport[n] = cheapest(U, V)
            if isinstance(transport[n], Dense):
                dense[n] = transport[n].D
        if not safe:  # form and look at the real sums (rare: bounds near the dtype's range)
            staged = {}
            for n, (U, V) in factors.items():
                new = self.cum[n] + (dense[n] if n in dense else U @ V)
                if not (bool(torch.isfinite(new.sum())) or bool(torch.isfinite(new).all())):
                    raise NonFiniteAggregate(overflow_reason(
                        f"folded base of layer {n!r} (with this round's {what})", self.dtype))
                staged[n] = new
            self.cum.update(staged)
            self.bound.update({n: float(t.abs().amax()) for n, t in staged.items()})
        else:  # in place, one pass per layer
            for n, (U, V) in factors.items():
                if n in dense:
                    self.cum[n].add_(dense[n])
                else:
                    self.cum[n].addmm_(U, V)
                self.bound[n] += grow[n]
        self.deltas[version] = transport
        for old in [v for v in self.deltas if v <= version - self.window]:
            del self.deltas[old]

    def missed(self, v: int, cur: int) -> list[BaseDelta] | None:
        """The versioned deltas ``v+1 … cur``, or ``None`` when some left the window."""
        if any(u not in self.deltas for u in range(v + 1, cur + 1)):
            return None
        return [BaseDelta(u, dict(self.deltas[u])) for u in range(v + 1, cur + 1)]

    def dense_numbers(self) -> int:
        return sum(s.d_out * s.d_in for s in self.layers.values())

    def choose(self, v: int, cur: int, extra: BaseDelta | None,
               reset_extra: Callable[[], dict[str, Tensor] | None] | None) -> list[BaseDelta]:
        """Deltas that move a client from (v, its old extra) to (cur, its new extra), cheapest form.

        ``extra`` is the incremental per-client correction (e.g. rank tails), ``reset_extra`` gives
        the per-client term to add on top of ``cum`` in a full reset (called only for one).
        """
        if v == cur:
            return [extra] if extra is not None else []
        inc = self.missed(v, cur) if 0 <= v < cur else None
        if inc is not None:
            if extra is not None:
                inc.append(extra)
            n_inc = sum(d.numel() for bd in inc for d in bd.layers.values())
            if n_inc < self.dense_numbers():
                return inc
        add = reset_extra() if reset_extra else None
        full = {n: self.cum[n] + add[n] if add else self.cum[n].clone() for n in self.layers}
        return [BaseDelta(cur, {n: Dense(t) for n, t in full.items()}, reset=True)]

    def state(self) -> dict:
        return {"cum": self.cum,
                "deltas": {str(v): {n: d.tensors() for n, d in ds.items()}
                           for v, ds in self.deltas.items()}}

    def load(self, st: dict) -> None:
        self.cum = {n: t.to(self.dtype).clone() for n, t in st["cum"].items()}
        self.bound = {n: float(t.abs().amax()) if t.numel() else 0.0 for n, t in self.cum.items()}
        self.deltas = {int(v): {n: from_tensors({k: t.to(self.dtype) for k, t in d.items()})
                                for n, d in ds.items()} for v, ds in st["deltas"].items()}
