"""FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313): A frozen, only B trained and averaged.

``A ∈ R^{r_max×k}`` is drawn once from the run's seed (Kaiming-uniform, the leading-slice draw of
``fedlora.lora.kaiming_a``, the same for every client) and never changes; ``B`` starts at 0. A
client trains only B (its DP-SGD per-sample gradients are those of B alone) and uploads only B.

Heterogeneous ranks (leading-slice convention, docs/strategies.md): a client of rank r trains
``B[:, :r]`` against the frozen ``A[:r]``. For Sync its frozen base holds the tail it does not
train, ``tail_r = s·B[:, r:]·A[r:]`` (sent as a factored reset delta whenever the global B moved
since the version it holds). Each client's upload is completed by the global tail it held,
``B̃_i = [B_i, B_old[:, r_i:]]``, and::

    B̄ = Σ p_i B̃_i = B_old + Σ_g (Σ_{i∈g} p_i B_i − P_g·B_old[:, :r_g])     (rank groups g, P_g = Σ_{i∈g} p_i)
    W_g(new) = W0 + s·B̄·A = Σ p_i (W0 + tail_{r_i} + s·B_i·A[:r_i]) = Σ p_i W_i      (exact)

Exact because ΔW is linear in B with A shared. Communication per layer and round: up ``d·r``
(half of LoRA's ``r(d+k)``); down ``d·r`` (B's slice; A travels as its seed, which the client
draws from: ``ClientPayload.a_seeds``) plus, below r_max, the tail ``(r_max−r)(d+k)`` (or dense
``d·k`` when fewer numbers) when it changed.

Subclasses reuse the machinery for another trained factor (RoLoRA alternates B and A) or a
re-factorisation after the average (FedSVD).
"""

from __future__ import annotations

import torch

from fedlora.strategies.base import Strategy
from fedlora.strategies.deltas import Dense, LowRank, cheapest
from fedlora.strategies.exactness import Term, low_rank
from fedlora.strategies.registry import register_strategy
from fedlora.strategies.sums import GroupSums
from fedlora.strategies.types import BaseDelta, ClientPayload, ClientUpdate

Tensor = torch.Tensor


@register_strategy
class FFA(Strategy):
    name = "ffa"
    trains = frozenset({"B"})
    uploads = frozenset({"B"})
    exact = True

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.A = {n: self._init_a(i, s) for i, (n, s) in enumerate(self.layers.items())}
        self.B = {n: self._zeros(s.d_out, self.r_max) for n, s in self.layers.items()}
        self._mark_drawn()

    def _mark_drawn(self) -> None:
        """Remember A as drawn: each layer's tensor and its in-place version counter."""
        self._drawn_A = {n: (t, t._version) for n, t in self.A.items()}

    def _a_seeds(self) -> dict[str, int] | None:
        """``{layer: seed}`` of A while every layer's A is still the initial draw: the same tensor,
        never written in place. Once a rule moves A (RoLoRA's A rounds, FedSVD's re-factorisation,
        or a plugin's in-place update) A travels as numbers from then on."""
        drawn = self._drawn_A
        if drawn is None or any(self.A.get(n) is not t or t._version != v for n, (t, v) in drawn.items()):
            self._drawn_A = None
            return None
        return {n: self._a_seed(i) for i, n in enumerate(self.layers)}

    # ---- payloads --------------------------------------------------------------------------------
    def _tail(self, n: str, r: int) -> LowRank | Dense:
        return cheapest(self.scale * self.B[n][:, r:], self.A[n][r:])

    def _payload(self, client_id: str, rank: int, base_version: int) -> ClientPayload:
        cur = self.version
        seeds = self._a_seeds()
        factors = {n: {"B": self.B[n][:, :rank].clone()} | ({} if seeds else {"A": self.A[n][:rank].clone()})
                   for n in self.layers}
        deltas: list[BaseDelta] = []
        # a client's base is identified by (version, rank) and holds tail_rank(version): at the
        # current version it holds the current tail, at r_max an empty one (W0) at any version
        if base_version != cur and rank < self.r_max:
            deltas = [BaseDelta(cur, {n: self._tail(n, rank) for n in self.layers}, reset=True)]
        return ClientPayload(client_id, rank, factors, deltas, cur, a_seeds=seeds or {})

    # ---- aggregation -----------------------------------------------------------------------------
    def _trained_key(self) -> str:
        """The factor this round's clients trained (the other one is frozen and shared)."""
        (key,) = self.round_trains()
        return key

    def _completed_mean(self, old: dict[str, Tensor], key: str, sums: GroupSums) -> dict[str, Tensor]:
        """``Σ p_i X̃_i``: each upload completed by the global components it did not train.

        A rank-r group adds ``Σ_{i∈g} p_i X_i − P_g·old[:r]`` to its leading slice (B: columns,
        A: rows) on top of ``old`` (Σ p_i = 1), so untouched components keep their value.
        """
        out = {}
        for i, n in enumerate(self.layers):
            new = old[n].clone()
            for r, by in sums.by_key.items():
                sl = (slice(None), slice(0, r)) if key == "B" else (slice(0, r), slice(None))
                new[sl].add_(by[key][i]).sub_(old[n][sl], alpha=sums.weight[r])
            out[n] = new
        return out

    def _aggregate(self, updates: list[ClientUpdate], p: list[float], sums: GroupSums) -> None:
        self._old = (self.A, self.B)
        key = self._trained_key()
        if key == "B":
            self.B = self._completed_mean(self.B, "B", sums)
        else:
            self.A = self._completed_mean(self.A, "A", sums)

    # ---- the exactness diagnostic ----------------------------------------------------------------
    def client_change(self, u: ClientUpdate, layer: str) -> list[Term]:
        # W_i − W_g(old): only the trained slice differs (the tail is in its base)
        r, f, s = u.rank, u.factors[layer], self.scale
        if "B" in f:
            return [low_rank(s, f["B"] - self.B[layer][:, :r], self.A[layer][:r])]
        return [low_rank(s, self.B[layer][:, :r], f["A"] - self.A[layer][:r])]

    def global_change(self, layer: str) -> list[Term]:
        A_old, B_old = self._old
        s = self.scale
        if self.A[layer] is A_old[layer]:
            return [low_rank(s, self.B[layer] - B_old[layer], self.A[layer])]
        return [low_rank(s, self.B[layer], self.A[layer] - A_old[layer])]

    def global_delta(self, layer: str) -> Tensor:
        return self.scale * self.B[layer] @ self.A[layer]

    # ---- checkpoints -----------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"A": self.A, "B": self.B}

    def _load_state(self, st: dict) -> None:
        self.A = {n: t.to(self.dtype).clone() for n, t in st["A"].items()}
        self.B = {n: t.to(self.dtype).clone() for n, t in st["B"].items()}
        # a resumed run sends what the uninterrupted one would: seeds while A is still the draw
        layers = enumerate(self.layers.items())
        if all(torch.equal(self.A[n], self._init_a(i, spec)) for i, (n, spec) in layers):
            self._mark_drawn()
        else:
            self._drawn_A = None
