"""RoLoRA (arXiv 2502.01755): alternate by round — train and average B with A frozen, then A with
B frozen.

Round t (``round_trains``: B when t is even, A when t is odd; the first round trains B, since
with ``B = 0`` the gradient of A is zero). Clients train and upload only that factor; the server
averages it, each upload completed by the global components it did not train (as FFA-LoRA)::

    even t:  B̄ = Σ p_i [B_i, B[:, r_i:]],     W_g(new) = W0 + s·B̄·A              = Σ p_i W_i
    odd t:   Ā = Σ p_i [A_i; A[r_i:]],        W_g(new) = W0 + s·B·Ā              = Σ p_i W_i

Each round is linear in the trained factor, so both are exact. Heterogeneous ranks follow
the leading-slice convention (docs/strategies.md): a client of rank r trains ``B[:, :r]`` or ``A[:r]`` and
its frozen base holds ``tail_r = s·B[:, r:]·A[r:]`` (a factored reset delta whenever the global
factors moved since the version it holds), as in ``ffa.py``. The alternation counts aggregated
rounds (``Strategy.round``): a round in which every update was rejected does not flip it.
Communication per layer: up ``d·r`` (B rounds) or ``r·k`` (A rounds); down ``r(d+k)`` plus the
tail below r_max. Each half-step of the alternation is one round of the federation (one exchange
per round, as every other rule here).
"""

from __future__ import annotations

from fedlora.strategies.ffa import FFA
from fedlora.strategies.registry import register_strategy


@register_strategy
class RoLoRA(FFA):
    name = "rolora"
    trains = frozenset({"A", "B"})  # over the run; each round trains and uploads one of them
    uploads = frozenset({"A", "B"})

    def round_trains(self) -> frozenset[str]:
        return frozenset({"B"}) if self.round % 2 == 0 else frozenset({"A"})

    def round_uploads(self) -> frozenset[str]:
        return self.round_trains()
