"""FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505): average the full-size updates, hand each
client the best approximation at its own rank.

Clients of any rank r_i train A and B, warm-started from their payload, and upload both. The
server forms the dense update and its SVD (per layer)::

    ΔW = Σ p_i s·B_i·A_i = U Σ Vᵀ                     (d×k; rank ≤ Σ r_i)
    W_g = W0 + ΔW = Σ p_i W_i                           (the global model: exact)
    client j (rank r_j):  B_j = U_{r_j} Σ_{r_j} / s,  A_j = V_{r_j}ᵀ    (s·B_j·A_j = [ΔW]_{r_j})

``[ΔW]_r`` is the best rank-r approximation (Eckart–Young): ``‖ΔW − [ΔW]_r‖_F² = Σ_{j>r} σ_j²``.
Heterogeneous ranks are native (no padding, no leading slice of stored factors: each rank gets its
own truncation of the one SVD; the leading r singular triplets are shared by every rank ≥ r).
Before the first aggregation ``ΔW = 0`` and clients start as plain LoRA: ``B = 0``, ``A`` the
seeded Kaiming draw (leading slice); components beyond ΔW's rank likewise get ``B = 0`` with
an orthonormal (dense SVD) or the seeded (QR path) row of A, so they can still learn.

Not exact for the clients: one of rank r_j < rank(ΔW) starts the next round from ``[ΔW]_{r_j}``,
not from ``W_g``. The round's aggregation error is that gap, over the round's clients, relative
to the round's change (the same denominator as FedAvg's)::

    error = sqrt(Σ_l Σ_i p_i Σ_{j>r_i} σ_{l,j}²) / sqrt(Σ_l ‖ΔW_l(new) − ΔW_l(old)‖_F²)

(0 when every client's rank covers ΔW's). The server keeps ΔW dense (d·k per layer) and computes
the SVD once per round: through QR of the stacked factors (O(ρ²(d+k)), ρ = Σ r_i) when
ρ < min(d, k), else densely; ΔW is replaced layer by layer, so a round holds one dense
layer beyond the state. Communication per layer: up and down ``r_i(d+k)``.
"""

from __future__ import annotations

import math

import torch

from fedlora.strategies.base import Strategy
from fedlora.strategies.defences import require_finite
from fedlora.strategies.exactness import Term, dense, low_rank
from fedlora.strategies.fedsvd import svd_of_product
from fedlora.strategies.registry import register_strategy
from fedlora.strategies.types import ClientPayload, ClientUpdate

Tensor = torch.Tensor


@register_strategy
class FlexLoRA(Strategy):
    name = "flexlora"
    sums_uploads = False

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.delta = {n: self._zeros(s.d_out, s.d_in) for n, s in self.layers.items()}
        self.A0 = {n: self._init_a(i, s) for i, (n, s) in enumerate(self.layers.items())}
        # the top-r_max factors of ΔW (B with s divided out; ΔW = 0: plain LoRA's start) and all
        # of ΔW's singular values, per layer
        self.A = {n: a.clone() for n, a in self.A0.items()}
        self.B = {n: self._zeros(s.d_out, self.r_max) for n, s in self.layers.items()}
        self.sv = {n: self._zeros(0) for n in self.layers}

    def _payload(self, client_id: str, rank: int, base_version: int) -> ClientPayload:
        factors = {n: {"A": self.A[n][:rank].clone(), "B": self.B[n][:, :rank].clone()} for n in self.layers}
        return ClientPayload(client_id, rank, factors, [], self.version)

    def _aggregate(self, updates: list[ClientUpdate], p: list[float], sums: None) -> None:
        s = self.scale
        col = torch.tensor([s * pi for u, pi in zip(updates, p) for _ in range(u.rank)],
                           dtype=self.dtype).unsqueeze(1)
        stacks = {}
        for n in self.layers:
            # U = [s·p_1B_1, …], V = [A_1; …]: ΔW = U·V (Uᵀ by rows: the faster copy, as FLoRA)
            U = torch.cat([u.factors[n]["B"].T for u in updates], 0).mul_(col).T
            stacks[n] = (U, torch.cat([u.factors[n]["A"] for u in updates], 0))
        # first what can fail, from the factors: the SVDs (no d×k on the QR path) and the range of
        # ΔW (max|U·V| ≤ ‖U‖_F‖V‖_F; the dense products are looked at only near the dtype's limit)
        A_new, B_new, sv = {}, {}, {}
        for n, spec in self.layers.items():
            P, S, Qh = svd_of_product(*stacks[n])
            m = min(self.r_max, S.numel())
            A, B = self.A0[n].clone(), self._zeros(spec.d_out, self.r_max)
            A[:m] = Qh[:m]
            B[:, :m] = P[:, :m] * (S[:m] / s)
            A_new[n], B_new[n], sv[n] = A, B, S
        limit = torch.finfo(self.dtype).max / 2
        if not all(float(U.norm()) * float(V.norm()) <= limit for U, V in stacks.values()):
            require_finite({n: U @ V for n, (U, V) in stacks.items()}, "averaged update", self.dtype)
        # then ΔW, one layer at a time (the old one is freed as the new one is written: no second
        # dense copy of the state), with how far it moved for the diagnostic
        self._moved = {}
        for n, (U, V) in stacks.items():
            new = U @ V
            if self.check_exactness:
                moved = torch.linalg.vector_norm(new - self.delta[n], dtype=torch.float64)
                self._moved[n] = float(moved) ** 2
            self.delta[n] = new
        self.A, self.B, self.sv = A_new, B_new, sv
        self._ranks = [u.rank for u in updates]

    def _aggregation_error(self, clients: list[dict[str, list[Term]]], p: list[float]) -> float:
        num = den = 0.0
        for n in self.layers:
            tail = [float(self.sv[n][r:].double().pow(2).sum()) for r in self._ranks]
            num += math.fsum(pi * t for pi, t in zip(p, tail))
            den += self._moved[n]
        return math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)

    def client_change(self, u: ClientUpdate, layer: str) -> list[Term]:
        f = u.factors[layer]
        return [low_rank(self.scale, f["B"], f["A"]), dense(-1.0, self.delta[layer])]

    def global_change(self, layer: str) -> list[Term]:
        raise NotImplementedError("flexlora measures its aggregation error from ΔW's singular values "
                                  "(_aggregation_error): the old ΔW is not kept")

    def global_delta(self, layer: str) -> Tensor:
        return self.delta[layer].clone()

    def _state(self) -> dict:
        # the factors too: an SVD's signs are not unique, and a restored run must hand out the same
        return {"delta": self.delta, "A": self.A, "B": self.B, "sv": self.sv}

    def _load_state(self, st: dict) -> None:
        cast = lambda d: {n: t.to(self.dtype).clone() for n, t in d.items()}  # noqa: E731
        self.delta, self.A, self.B, self.sv = cast(st["delta"]), cast(st["A"]), cast(st["B"]), cast(st["sv"])
