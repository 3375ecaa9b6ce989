"""FedSA-LoRA: share and average A only; B (and the task head) stay on each client.

    Ā[j, :] = Σ_{i: r_i > j} p_i A_i[j, :] / Σ_{i: r_i > j} p_i

Client i's model is ``W0 + s·B_i·Ā[:r_i]`` with its own, persistent ``B_i`` (initially 0). There is
no single global model: evaluation is each client's personalised model on its own validation shard.
Updates carry only A; an update carrying B (or a head) is rejected.
"""

from __future__ import annotations

import torch

from fedlora.strategies.base import Strategy
from fedlora.strategies.registry import register_strategy
from fedlora.strategies.sums import GroupSums
from fedlora.strategies.types import ClientPayload, ClientUpdate

Tensor = torch.Tensor


@register_strategy
class FedSA(Strategy):
    name = "fedsa"
    uploads = frozenset({"A"})
    has_global_model = False
    shares_head = False

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.A = {n: self._init_a(i, s) for i, (n, s) in enumerate(self.layers.items())}

    def _payload(self, client_id: str, rank: int, base_version: int) -> ClientPayload:
        return ClientPayload(client_id, rank, {n: {"A": self.A[n][:rank].clone()} for n in self.layers},
                             [], self.version)

    def _aggregate(self, updates: list[ClientUpdate], p: list[float], sums: GroupSums) -> None:
        self.A = self._component_means(self.A, "A", 0, sums)

    def global_delta(self, layer: str) -> Tensor:
        raise ValueError("fedsa has no global model (B stays on each client); evaluate the clients' "
                         "personalised models instead")

    def _state(self) -> dict:
        return {"A": self.A}

    def _load_state(self, st: dict) -> None:
        self.A = {n: t.to(self.dtype).clone() for n, t in st["A"].items()}
