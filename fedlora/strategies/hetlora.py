"""HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432): zero-padding, sparsity-weighted aggregation
and local rank self-pruning. The inexact heterogeneous-rank baseline.

The server keeps B (d×r_max) and A (r_max×k). Client i of current rank r_i (its node's rank, or
less once it pruned: ranks only go down) gets the truncation ``B[:, :r_i]``, ``A[:r_i]`` and
trains both. Round t, accepted clients i with base weights p_i (``n_i/Σn_j`` or uniform)::

    S_i = ‖ΔW_i‖_F = sqrt(Σ_l ‖B_{i,l}·A_{i,l}‖_F²)        (the "sparsity" of client i's update)
    w_i = p_i·S_i / Σ_j p_j·S_j                               (HetLoRA's weights: p uniform)
    B̄ = Σ_i w_i·pad(B_i),    Ā = Σ_i w_i·pad(A_i)           (zero-padded to r_max)

so component j is ``Σ_{i: r_i>j} w_i·B_i[:, j]``, not renormalised over the clients holding it.
Global model ``W0 + s·B̄·Ā``; the aggregation error is FedAvg's diagnostic under the weights w_i.

Local rank self-pruning (carried in the payload, done by ``fedlora.client.RankSelfPruning``): with
``r' = ⌊γ·r_i⌋`` (γ = ``hetlora_gamma``; no pruning when r' < 1) the client's local objective adds
``λ·Σ_l ‖B_l[:, r':]‖_F·‖A_l[r':]‖_F`` (λ = ``hetlora_lambda``) over the components it would drop;
after training, when that norm product is smaller than at the start of the round, it drops them
and uploads at rank r'. The server accepts an update at r_i or r' and sends that client rank r'
from then on.

Departures from the paper, and why:
- a rank component that no client of the round holds keeps its global value (the zero-padded sum
  would set it to 0, and a zero column of B with a zero row of A never trains again);
- the weights multiply the paper's ``S_i/ΣS_j`` by the run's base weights p_i: with
  ``weighting = "uniform"`` they are the paper's; the weight cap (``max_weight_share``) applies to
  w_i, so no client takes a round by inflating its update's norm;
- the penalty is applied as a decoupled step (``θ ← θ − lr·∇R(θ)`` before each optimizer step, as
  AdamW applies weight decay): with SGD it is exactly the gradient of the penalised loss; with
  DP-SGD it stays outside the per-sample clipping and noise (R does not depend on the data, so the
  guarantee is unchanged);
- the pruning rule is the one reconstructed in shared/reference/algorithms.md §8 (not checked
  against the paper's text): the tail's norm product after local training against its value at
  the start of the round (what the client was sent), so the client needs no state of its own;
  the defaults λ = 0.01, γ = 0.9 are ours (the paper's are not known here).

Heterogeneous ranks: the leading slice (the paper's truncation) and zero padding. Communication
per layer: up and down ``r_i(d+k)`` at the client's current rank.
"""

from __future__ import annotations

import math

import torch

from fedlora.strategies.defences import capped_weights
from fedlora.strategies.fedavg import FedAvg
from fedlora.strategies.registry import register_strategy
from fedlora.strategies.sums import GroupSums
from fedlora.strategies.types import ClientPayload, ClientUpdate

Tensor = torch.Tensor


def prune_target(rank: int, gamma: float) -> int:
    """``⌊γ·r⌋``, or 0 when nothing would be left or nothing dropped (no pruning)."""
    r = math.floor(gamma * rank + 1e-9)  # γ·r that should be an integer may round just below it
    return r if 1 <= r < rank else 0


@register_strategy
class HetLoRA(FedAvg):
    name = "hetlora"
    config_keys = ("hetlora_lambda", "hetlora_gamma")

    def __init__(self, *args, hetlora_lambda: float = 0.01, hetlora_gamma: float = 0.9, **kw) -> None:
        super().__init__(*args, **kw)
        if not (isinstance(hetlora_lambda, int | float) and math.isfinite(hetlora_lambda)
                and hetlora_lambda >= 0):
            raise ValueError(f"hetlora_lambda must be a finite number >= 0, got {hetlora_lambda!r}")
        if not (isinstance(hetlora_gamma, int | float) and 0 < hetlora_gamma < 1):
            raise ValueError(f"hetlora_gamma must be in (0, 1), got {hetlora_gamma!r}")
        self.lam, self.gamma = float(hetlora_lambda), float(hetlora_gamma)
        self.ranks: dict[str, int] = {}  # each client's rank after its self-pruning so far

    def _payload(self, client_id: str, rank: int, base_version: int) -> ClientPayload:
        r = min(rank, self.ranks.get(client_id, rank))
        p = super()._payload(client_id, r, base_version)
        p.prune_to, p.tail_penalty = prune_target(r, self.gamma), self.lam
        return p

    def upload_ranks(self, sent: int) -> frozenset[int]:
        return frozenset({sent, prune_target(sent, self.gamma)} - {0})

    def sparsity(self, u: ClientUpdate) -> float:
        """``S_i = sqrt(Σ_l ‖B_l·A_l‖_F²)``, each ``‖B·A‖_F² = Σ (BᵀB)∘(AAᵀ)`` (r×r, no d×k)."""
        sq = 0.0
        for f in u.factors.values():
            B, A = f["B"].double(), f["A"].double()
            sq += max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0)
        return math.sqrt(sq)

    def _weights(self, updates: list[ClientUpdate]) -> list[float]:
        if self.weighting == "samples":
            base = [float(u.num_examples) for u in updates]
        else:
            base = [1.0] * len(updates)
        raw = [b * self.sparsity(u) for b, u in zip(base, updates)]
        total = math.fsum(raw)
        if not total > 0:  # every update is zero (nothing trained): the base weights
            raw, total = base, math.fsum(base)
        return capped_weights([x / total for x in raw], self.max_weight_share)

    def _aggregate(self, updates: list[ClientUpdate], p: list[float], sums: GroupSums) -> None:
        self._old = (self.A, self.B)
        held = torch.zeros(self.r_max, dtype=torch.bool)
        for r in sums.by_key:
            held[:r] = True
        A_new, B_new = {}, {}
        for i, n in enumerate(self.layers):
            accA, accB = torch.zeros_like(self.A[n]), torch.zeros_like(self.B[n])
            for r, by in sums.by_key.items():  # Σ_i w_i·pad(X_i): each group's sum into its slice
                accA[:r].add_(by["A"][i])
                accB[:, :r].add_(by["B"][i])
            A_new[n] = torch.where(held.view(-1, 1), accA, self.A[n])
            B_new[n] = torch.where(held.view(1, -1), accB, self.B[n])
        self.A, self.B = A_new, B_new
        for u in updates:
            self.ranks[u.client_id] = u.rank

    def _state(self) -> dict:
        return {**super()._state(), "ranks": dict(self.ranks)}

    def _load_state(self, st: dict) -> None:
        super()._load_state(st)
        self.ranks = {str(c): int(r) for c, r in st.get("ranks", {}).items()}
