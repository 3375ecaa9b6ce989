"""Fed-SB (LoRA-SB): frozen, shared B and A; clients train only the r×r matrix R.

    ΔW = s·B·R·A,   B ∈ R^{d×r}, A ∈ R^{r×k} frozen;   R ∈ R^{r×r} trained

Initialisation (``initialize``), once per run at the server, from the accumulated weight gradient G
(d×k) of each target layer: ``U = −η·sign(G)``, truncated SVD ``Uᵀ ≈ P S Qᵀ`` at rank r_max;
``A = Pᵀ``, ``B = Q``, ``R₀ = S``. B and A go to each client once (counted in bytes).

Round (heterogeneous ranks: client i trains the leading r_i×r_i block)::

    R̄ = R + Σ p_i·pad(R_i − R[:r_i, :r_i])          (only this round's updates)
    W_g = W0 + s·B·R̄·A = Σ p_i W_i                     (exact: ΔW is linear in R)

For Sync, a client of rank r holds ``W0 + tail_r`` with ``tail_r = s·B·(R − pad(R[:r,:r]))·A``, the
entries it does not train. It receives the frozen components it does not train, ``B[:, r:]`` and
``A[r:]``, once with its first payload (``frozen``), so later tail changes travel as their
r_max×r_max core (``SBCore(M_cur − M_v)``) and the client folds ``s·B·M·A`` itself
(``LoRALinear.sb_delta``). Communication per round: r_i² up, r_i² (+ r_max² below r_max) down per
layer, independent of the number of clients; once per client: its B and A, r_max(d+k) per layer.
"""

from __future__ import annotations

import math

import torch

from fedlora.strategies.base import Strategy
from fedlora.strategies.deltas import SBCore
from fedlora.strategies.exactness import Term, low_rank
from fedlora.strategies.registry import register_strategy
from fedlora.strategies.sums import GroupSums
from fedlora.strategies.types import BaseDelta, ClientPayload, ClientUpdate

Tensor = torch.Tensor


@register_strategy
class FedSB(Strategy):
    name = "fedsb"
    adapter = "sb"
    trains = frozenset({"R"})
    uploads = frozenset({"R"})
    init_from = "server-gradients"
    exact = True

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.initialized = False
        self.A: dict[str, Tensor] = {}
        self.B: dict[str, Tensor] = {}
        self.R: dict[str, Tensor] = {}
        self.R_at: dict[int, dict[str, Tensor]] = {}

    def initialize(self, gradients: dict[str, Tensor], eta: float = 1.0) -> None:
        """LoRA-SB init from ``{layer: accumulated d×k weight gradient}`` (see module docstring).

        ``eta`` is the size of the approximated first optimizer step: at init the model is
        ``W0 + s·B·R₀·A ≈ W0 − s·η·sign(G)``, so η must be a learning rate (LoRA-SB: the LR of the
        first step), not 1 — with η = 1 every weight moves by ~1 and a pretrained model is lost.
        """
        if not (isinstance(eta, int | float) and math.isfinite(eta) and eta > 0):
            raise ValueError(f"eta must be a positive finite number (a learning rate), got {eta!r}")
        if set(gradients) != set(self.layers):
            raise ValueError(f"gradients must cover exactly the layers {sorted(self.layers)}; got "
                             f"{sorted(gradients)}")
        for n, spec in self.layers.items():
            G = gradients[n]
            if tuple(G.shape) != (spec.d_out, spec.d_in):
                raise ValueError(f"gradient of {n!r} has shape {tuple(G.shape)}, expected "
                                 f"({spec.d_out}, {spec.d_in})")
            if not torch.isfinite(G).all():
                raise ValueError(f"gradient of {n!r} has non-finite values")
            Ut = (-eta * torch.sign(G.double())).T  # k×d
            P, S, Qh = torch.linalg.svd(Ut, full_matrices=False)
            r = self.r_max
            self.A[n] = P[:, :r].T.contiguous().to(self.dtype)
            self.B[n] = Qh[:r].T.contiguous().to(self.dtype)
            self.R[n] = torch.diag(S[:r]).to(self.dtype)
        self.initialized = True
        # the init moves the global model off W0: a version step, so that version 0 keeps meaning
        # "W0 exactly" (a client there is new and gets the frozen factors; one at 1 has them)
        self.version += 1
        self.R_at = {self.version: dict(self.R)}

    def _require_init(self) -> None:
        if not self.initialized:
            raise RuntimeError("fedsb needs its initialisation first: call strategy.initialize("
                               "gradients) with each layer's accumulated weight gradient")

    def _masked(self, R: Tensor, r: int) -> Tensor:
        """``R − pad(R[:r, :r])``: the entries a rank-r client does not train."""
        M = R.clone()
        M[:r, :r] = 0
        return M

    def _payload(self, client_id: str, rank: int, base_version: int) -> ClientPayload:
        self._require_init()
        cur, v = self.version, base_version
        factors = {n: {"R": self.R[n][:rank, :rank].clone()} for n in self.layers}
        deltas: list[BaseDelta] = []
        frozen = None
        fresh = v == 0 or v > cur or v not in self.R_at
        if fresh:  # the client holds W0: frozen factors once, and its tail as a reset delta
            for n in self.layers:
                factors[n]["A"] = self.A[n][:rank].clone()
                factors[n]["B"] = self.B[n][:, :rank].clone()
            if rank < self.r_max:
                frozen = {n: {"A_tail": self.A[n][rank:].clone(), "B_tail": self.B[n][:, rank:].clone()}
                          for n in self.layers}
                deltas = [BaseDelta(cur, {n: SBCore(self._masked(self.R[n], rank)) for n in self.layers},
                                    reset=True)]
            elif v != 0:  # an unknown base: back to W0
                deltas = [BaseDelta(cur, {n: SBCore(torch.zeros_like(self.R[n])) for n in self.layers},
                                    reset=True)]
        elif v != cur and rank < self.r_max:  # the change of its tail: an r_max×r_max core per layer
            R_v = self.R_at[v]
            deltas = [BaseDelta(cur, {n: SBCore(self._masked(self.R[n], rank) - self._masked(R_v[n], rank))
                                      for n in self.layers})]
        return ClientPayload(client_id, rank, factors, deltas, cur, frozen=frozen,
                             meta={"frozen_sent": fresh})

    def aggregate(self, updates):
        self._require_init()
        return super().aggregate(updates)

    def _aggregate(self, updates: list[ClientUpdate], p: list[float], sums: GroupSums) -> None:
        # Σ p_i·pad(R_i − R[:r_i, :r_i]) per rank group: Σ_{i∈g} p_i R_i − (Σ_{i∈g} p_i)·R[:r, :r]
        self._old_R = dict(self.R)
        for i, n in enumerate(self.layers):
            R = self.R[n]
            new = R.clone()
            for r, by in sums.by_key.items():
                new[:r, :r].add_(by["R"][i]).sub_(R[:r, :r], alpha=sums.weight[r])
            self.R[n] = new
        self.R_at[self.version + 1] = dict(self.R)
        for old in [v for v in self.R_at if v <= self.version + 1 - self.history]:
            del self.R_at[old]

    def client_change(self, u: ClientUpdate, layer: str) -> list[Term]:
        # s·B·pad(R_i − R[:r, :r])·A: B is shared, so all the clients' terms merge into one
        r, R = u.rank, self.R[layer]
        X = torch.zeros_like(R)
        X[:r, :r] = u.factors[layer]["R"] - R[:r, :r]
        return [low_rank(self.scale, self.B[layer], X @ self.A[layer])]

    def global_change(self, layer: str) -> list[Term]:
        return [low_rank(self.scale, self.B[layer], (self.R[layer] - self._old_R[layer]) @ self.A[layer])]

    def global_delta(self, layer: str) -> Tensor:
        self._require_init()
        return self.scale * self.B[layer] @ self.R[layer] @ self.A[layer]

    def _state(self) -> dict:
        return {"initialized": self.initialized, "A": self.A, "B": self.B, "R": self.R,
                "R_at": {str(v): R for v, R in self.R_at.items()}}

    def _load_state(self, st: dict) -> None:
        self.initialized = bool(st["initialized"])
        cast = lambda d: {n: t.to(self.dtype).clone() for n, t in d.items()}  # noqa: E731
        self.A, self.B, self.R = cast(st["A"]), cast(st["B"]), cast(st["R"])
        self.R_at = {int(v): cast(R) for v, R in st["R_at"].items()}
