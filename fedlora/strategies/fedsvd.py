"""FedSVD (arXiv 2505.12805): B trained with A fixed, then an SVD re-factorisation of ``B̄·A``.

Clients train and upload only B (so with DP-SGD the per-sample gradients are those of B alone),
as in FFA-LoRA; the server averages B (each upload completed by the global columns its client
did not train, ``ffa.py``) and re-factorises the product::

    B̄ = Σ p_i [B_i, B[:, r_i:]]
    B̄·A = U Σ Vᵀ                  (rank ≤ r_max: this SVD is exact, no truncation loss)
    A ← V_{r_max}ᵀ  (orthonormal rows),      B ← U_{r_max} Σ_{r_max}
    W_g(new) = W0 + s·B·A = W0 + s·B̄·A_old = Σ p_i W_i      (exact)

The first round trains against the seeded Kaiming A (as FFA-LoRA); from the first aggregation on
A has orthonormal rows, ordered by singular value. The re-factorisation runs after every round (the
paper allows a period; its reference code's default is every round, B = U_rΣ_r, A = V_rᵀ, as here).

Heterogeneous ranks follow the leading-slice convention (docs/strategies.md), which here is the best one:
a client of rank r trains ``B[:, :r]``
against ``A[:r]``, the top-r right singular vectors of the global update, and its frozen base
holds the trailing singular components ``tail_r = s·B[:, r:]·A[r:]`` (a factored reset delta each
round it missed, since the re-factorisation moves A every round). ``r_max`` must not exceed
``min(d_out, d_in)`` of any layer (``r_max`` orthonormal rows must exist).

The SVD of ``B̄·A`` goes through QR of both factors and an r_max×r_max SVD: O(r_max²(d+k)), never
a d×k matrix. Communication per layer as FFA-LoRA: up ``d·r``; down ``r(d+k)`` plus the tail.
"""

from __future__ import annotations

import torch

from fedlora.strategies.defences import NonFiniteAggregate
from fedlora.strategies.exactness import Term, low_rank
from fedlora.strategies.ffa import FFA
from fedlora.strategies.registry import register_strategy
from fedlora.strategies.sums import GroupSums
from fedlora.strategies.types import ClientUpdate

Tensor = torch.Tensor


def svd_of_product(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(P, S, Qh)`` with ``U·V = P·diag(S)·Qh`` (thin SVD; ``m = min(ρ, d, k)`` values, descending).

    ``U`` is d×ρ, ``V`` ρ×k. With ρ < min(d, k): ``U = Q_U R_U``, ``Vᵀ = Q_V R_V`` (QR) and the
    SVD of the ρ×ρ core ``R_U R_Vᵀ`` — O(ρ²(d+k)), no d×k product. Otherwise the dense SVD. In
    float64 for the small core either way (its singular vectors set the new factors). A
    decomposition that fails (LAPACK not converging) raises ``NonFiniteAggregate``: the round is
    rejected whole, before any state changes, never an exception out of ``aggregate``.
    """
    d, rho = U.shape
    k = V.shape[1]
    try:
        if rho < min(d, k):
            Qu, Ru = torch.linalg.qr(U)
            Qv, Rv = torch.linalg.qr(V.T)
            Pm, S, Qmh = torch.linalg.svd((Ru @ Rv.T).double())
            return Qu @ Pm.to(U.dtype), S.to(U.dtype), Qmh.to(U.dtype) @ Qv.T
        return torch.linalg.svd(U @ V, full_matrices=False)
    except torch.linalg.LinAlgError as e:
        raise NonFiniteAggregate(f"the SVD of the averaged update failed ({e}): a diverged or hostile "
                                 "client") from e


@register_strategy
class FedSVD(FFA):
    name = "fedsvd"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        for n, spec in self.layers.items():
            if self.r_max > min(spec.d_out, spec.d_in):
                raise ValueError(f"fedsvd: r_max={self.r_max} exceeds min(d_out, d_in) of layer {n!r}; "
                                 "A's r_max rows cannot be orthonormal")

    def _aggregate(self, updates: list[ClientUpdate], p: list[float], sums: GroupSums) -> None:
        self._old = (self.A, self.B)
        self._mean = self._completed_mean(self.B, "B", sums)  # B̄, against the old A
        A_new, B_new = {}, {}
        for n in self.layers:
            P, S, Qh = svd_of_product(self._mean[n], self.A[n])  # exactly r_max values (r_max ≤ d, k)
            A_new[n] = Qh.contiguous()
            B_new[n] = (P * S).contiguous()
        self.A, self.B = A_new, B_new

    def global_change(self, layer: str) -> list[Term]:
        A_old, B_old = self._old
        s = self.scale
        # the average against the old A, plus what the re-factorisation changed (≈ 0: it is exact
        # up to rounding, which the diagnostic then shows)
        return [low_rank(s, self._mean[layer] - B_old[layer], A_old[layer]),
                low_rank(s, self.B[layer], self.A[layer]), low_rank(-s, self._mean[layer], A_old[layer])]
