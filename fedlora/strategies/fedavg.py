"""FedAvg of LoRA factors (FedIT): the inexact baseline.

Clients train A and B from the global factors (leading slice at their rank). Each rank component j
is averaged over the clients that hold it, weights renormalised over them::

    B̄[:, j] = Σ_{i: r_i > j} p_i B_i[:, j] / Σ_{i: r_i > j} p_i        (rows of A likewise)

Global model ``W0 + s·B̄·Ā``. Inexact: the gap ``Σ p_i B_i A_i − B̄Ā = Σ p_i (B_i − B̄)(A_i − Ā)``
is reported as the aggregation error. No base deltas.
"""

from __future__ import annotations

import torch

from fedlora.strategies.base import Strategy
from fedlora.strategies.exactness import Term, low_rank
from fedlora.strategies.registry import register_strategy
from fedlora.strategies.sums import GroupSums
from fedlora.strategies.types import ClientPayload, ClientUpdate

Tensor = torch.Tensor


@register_strategy
class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.A = {n: self._init_a(i, s) for i, (n, s) in enumerate(self.layers.items())}
        self.B = {n: self._zeros(s.d_out, self.r_max) for n, s in self.layers.items()}

    def _payload(self, client_id: str, rank: int, base_version: int) -> ClientPayload:
        factors = {n: {"A": self.A[n][:rank].clone(), "B": self.B[n][:, :rank].clone()}
                   for n in self.layers}
        return ClientPayload(client_id, rank, factors, [], self.version)

    def _aggregate(self, updates: list[ClientUpdate], p: list[float], sums: GroupSums) -> None:
        self._old = (self.A, self.B)
        self.A = self._component_means(self.A, "A", 0, sums)
        self.B = self._component_means(self.B, "B", 1, sums)

    def client_change(self, u: ClientUpdate, layer: str) -> list[Term]:
        f, s = u.factors[layer], self.scale
        return [low_rank(s, f["B"], f["A"]), low_rank(-s, self.B[layer], self.A[layer])]

    def global_change(self, layer: str) -> list[Term]:
        A_old, B_old = self._old
        s = self.scale
        return [low_rank(s, self.B[layer], self.A[layer]), low_rank(-s, B_old[layer], A_old[layer])]

    def global_delta(self, layer: str) -> Tensor:
        return self.scale * self.B[layer] @ self.A[layer]

    def _state(self) -> dict:
        return {"A": self.A, "B": self.B}

    def _load_state(self, st: dict) -> None:
        self.A = {n: t.to(self.dtype).clone() for n, t in st["A"].items()}
        self.B = {n: t.to(self.dtype).clone() for n, t in st["B"].items()}
