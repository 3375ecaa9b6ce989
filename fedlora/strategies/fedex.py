"""FedEx-LoRA: FedAvg of the factors plus the exact residual folded into the frozen base.

Round t, accepted clients i with weights p_i, ranks r_i ≤ r_max::

    B̄, Ā      per-rank-component weighted means (as FedAvg), at r_max
    ΔW_res    = Σ p_i (base_i − base_g) + s·(Σ p_i B_i A_i − B̄ Ā)
    base_g   ← base_g + ΔW_res            (nn.Linear orientation d×k: no transpose)
    W_g(new)  = base_g + s·B̄Ā = Σ p_i W_i  (exact)

A client of rank r < r_max trains the leading slice (B̄[:, :r], Ā[:r]); for Sync its base is
``base_g + tail_r`` with ``tail_r = s·B̄[:, r:]·Ā[r:, :]`` (the dropped components), so
``base_i − base_g = tail_{r_i}`` above. The server sends each client exactly what moves its base
from ``(v, tail_r(v))`` to ``(cur, tail_r(cur))``: the residuals it missed and the tail change, as
factors, or one dense full delta when that is fewer numbers.

Residual transport: ``U = s·[p_1B_1 … p_KB_K, −B̄, P_r·B̄_old[:, r:] …]`` (``P_r``: the weight of
the rank-r clients),
``V = [A_1; …; A_K; Ā; Ā_old[r:] …]`` (ρ columns) when ``ρ(d+k) < d·k``, else dense ``U·V``.
The server keeps ``base_g − W0`` dense in its own dtype (float32 or better).
"""

from __future__ import annotations

import torch

from fedlora.strategies.deltas import Dense, LowRank
from fedlora.strategies.exactness import Term, from_delta, low_rank
from fedlora.strategies.fedavg import FedAvg
from fedlora.strategies.history import BaseHistory
from fedlora.strategies.registry import register_strategy
from fedlora.strategies.sums import GroupSums
from fedlora.strategies.types import BaseDelta, ClientPayload, ClientUpdate

Tensor = torch.Tensor


@register_strategy
class FedEx(FedAvg):
    name = "fedex"
    exact = True

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.base = BaseHistory(self.layers, self.dtype, self.history)
        # global factors per version, for the tails of clients that skipped rounds
        self.factors_at: dict[int, tuple[dict[str, Tensor], dict[str, Tensor]]] = {
            0: (dict(self.A), dict(self.B))}

    def _payload(self, client_id: str, rank: int, base_version: int) -> ClientPayload:
        cur, v, s = self.version, base_version, self.scale

        def tails_now() -> dict[str, Tensor] | None:  # the client's tail now, dense: a full reset only
            return {n: s * self.B[n][:, rank:] @ self.A[n][rank:] for n in self.layers} \
                if rank < self.r_max else None

        if v > cur or (0 < v < cur and v not in self.factors_at):
            deltas = [self._full_reset(tails_now())]  # a base we cannot reconstruct: resync
        else:
            extra = None  # tail(cur, r) − tail(v, r), factored (at version 0 the base is W0: no tail)
            if rank < self.r_max and v == 0 < cur:
                extra = BaseDelta(cur, {n: LowRank(s * self.B[n][:, rank:], self.A[n][rank:].clone())
                                        for n in self.layers})
            elif rank < self.r_max and 0 < v < cur:
                A_v, B_v = self.factors_at[v]
                extra = BaseDelta(cur, {n: LowRank(
                    torch.cat([s * self.B[n][:, rank:], -s * B_v[n][:, rank:]], 1),
                    torch.cat([self.A[n][rank:], A_v[n][rank:]], 0)) for n in self.layers})
            deltas = self.base.choose(v, cur, extra, tails_now)
        factors = {n: {"A": self.A[n][:rank].clone(), "B": self.B[n][:, :rank].clone()}
                   for n in self.layers}
        return ClientPayload(client_id, rank, factors, deltas, cur)

    def _full_reset(self, extra: dict[str, Tensor] | None) -> BaseDelta:
        return BaseDelta(self.version, {n: Dense(self.base.cum[n] + (extra[n] if extra else 0))
                                        for n in self.layers}, reset=True)

    def _aggregate(self, updates: list[ClientUpdate], p: list[float], sums: GroupSums) -> None:
        A_old, B_old = self._old = (self.A, self.B)
        A_new = self._component_means(A_old, "A", 0, sums)
        B_new = self._component_means(B_old, "B", 1, sums)
        tail_w: dict[int, float] = {}
        for u, pi in zip(updates, p):
            if u.rank < self.r_max:
                tail_w[u.rank] = tail_w.get(u.rank, 0.0) + pi
        residuals = {}
        s = self.scale
        # U's column scales (the same for every layer): s·p_i per client column, −s for B̄, s·w_r
        # for the rank-r tails; applied once to the concatenation instead of scaling copies
        scales = [s * pi for u, pi in zip(updates, p) for _ in range(u.rank)] + [-s] * self.r_max
        for r, w in tail_w.items():
            scales += [s * w] * (self.r_max - r)
        col = torch.tensor(scales, dtype=self.dtype).unsqueeze(1)
        for n in self.layers:
            # Uᵀ stacked by rows (each Bᵢᵀ a block of rows) copies 3× faster than U by columns
            Uts = [u.factors[n]["B"].T for u in updates] + [B_new[n].T]
            Vs = [u.factors[n]["A"] for u in updates] + [A_new[n]]
            for r in tail_w:
                Uts.append(B_old[n][:, r:].T)
                Vs.append(A_old[n][r:])
            residuals[n] = (torch.cat(Uts, 0).mul_(col).T, torch.cat(Vs, 0))
        # folded in place (one pass per layer); a round that would overflow the base (a sustained
        # attack of large in-range updates) raises first and changes nothing
        self.base.fold(self.version + 1, residuals, "residual")
        self.A, self.B = A_new, B_new
        self.factors_at[self.version + 1] = (dict(self.A), dict(self.B))
        for old in [v for v in self.factors_at if v <= self.version + 1 - self.history]:
            del self.factors_at[old]

    def client_change(self, u: ClientUpdate, layer: str) -> list[Term]:
        terms = super().client_change(u, layer)  # s·B_i·A_i − s·B̄·Ā
        if u.rank < self.r_max:  # + its tail s·B̄[:, r:]·Ā[r:] (part of its base)
            terms.append(low_rank(self.scale, self.B[layer][:, u.rank:], self.A[layer][u.rank:]))
        return terms

    def global_change(self, layer: str) -> list[Term]:
        residual = self.base.deltas[self.version + 1][layer]  # what was folded into the base
        return super().global_change(layer) + [from_delta(residual)]

    def global_delta(self, layer: str) -> Tensor:
        return self.base.cum[layer] + self.scale * self.B[layer] @ self.A[layer]

    def _state(self) -> dict:
        return {"A": self.A, "B": self.B, "base": self.base.state(),
                "factors_at": {str(v): {"A": a, "B": b} for v, (a, b) in self.factors_at.items()}}

    def _load_state(self, st: dict) -> None:
        super()._load_state(st)
        self.base.load(st["base"])
        self.factors_at = {
            int(v): ({n: t.to(self.dtype) for n, t in f["A"].items()},
                     {n: t.to(self.dtype) for n, t in f["B"].items()})
            for v, f in st["factors_at"].items()}
