"""The versioned frozen base shared by the exact strategies that fold into ``W0``.

``cum[layer] = base_g − W0`` (dense, server dtype) and a bounded window of per-version deltas, so a
client holding version ``v`` receives exactly the deltas it missed (``v+1 … cur``), or one dense
``reset`` delta (the full ``base_g − W0``) when that is fewer numbers or ``v`` left the window.
"""

from __future__ import annotations

import torch

from fedlora.strategies.deltas import Delta, Dense, from_tensors
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

    def push(self, version: int, transport: dict[str, Delta], dense: dict[str, Tensor]) -> None:
        """Record ``base_g(version) = base_g(version−1) + delta``."""
        for n, d in dense.items():
            self.cum[n].add_(d)
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
               reset_extra: dict[str, Tensor] | None) -> list[BaseDelta]:
        """Deltas that move a client from (v, its old extra) to (cur, its new extra), cheapest form.

        ``extra`` is the incremental per-client correction (e.g. rank tails), ``reset_extra`` the
        per-client term to add on top of ``cum`` in a full reset.
        """
        if v == cur:
            return [extra] if extra is not None else []
        inc = self.missed(v, cur) if 0 < v < cur else None
        if v == 0 and cur > 0:
            inc = None
        if inc is not None:
            if extra is not None:
                inc.append(extra)
            n_inc = sum(d.numel() for bd in inc for d in bd.layers.values())
            if n_inc < self.dense_numbers():
                return inc
        full = {n: self.cum[n] + (reset_extra[n] if reset_extra else 0) for n in self.layers}
        return [BaseDelta(cur, {n: Dense(t.clone()) for n, t in full.items()}, reset=True)]

    def state(self) -> dict:
        return {"cum": self.cum,
                "deltas": {str(v): {n: d.tensors() for n, d in ds.items()}
                           for v, ds in self.deltas.items()}}

    def load(self, st: dict) -> None:
        self.cum = {n: t.to(self.dtype).clone() for n, t in st["cum"].items()}
        self.deltas = {int(v): {n: from_tensors({k: t.to(self.dtype) for k, t in d.items()})
                                for n, d in ds.items()} for v, ds in st["deltas"].items()}
