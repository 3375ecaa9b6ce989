"""FLoRA: stack the clients' factors, merge the stack into the frozen base, re-initialise.

Every round each client starts a fresh adapter at its own rank r_i: ``B = 0``,
``A = kaiming(r_max, k; seed_t,layer)[:r_i]`` (sent as the seed, ``ClientPayload.a_seeds``: the
client draws it). The server stacks::

    A_stack = [p_1 A_1; …; p_K A_K]   (Σr_i × k)      B_stack = [B_1, …, B_K]   (d × Σr_i)
    s·B_stack·A_stack = s·Σ p_i B_i A_i      (transported as U = [s·p_1B_1, …], V = [A_1; …])
    base_g ← base_g + s·B_stack·A_stack,       W_g(new) = base_g = Σ p_i W_i   (exact)

Heterogeneous ranks are native. Every client, also one that skipped rounds or a new one, folds
every stack it missed, in order (``base_version``), or one dense full delta when cheaper. Transport
is the stack (factored) when ``Σr_i (d+k) < d·k``, else dense.
"""

from __future__ import annotations

import torch

from fedlora.strategies.base import Strategy
from fedlora.strategies.deltas import Dense
from fedlora.strategies.exactness import Term, from_delta, low_rank
from fedlora.strategies.history import BaseHistory
from fedlora.strategies.registry import register_strategy
from fedlora.strategies.types import BaseDelta, ClientPayload, ClientUpdate

Tensor = torch.Tensor


@register_strategy
class FLoRA(Strategy):
    name = "flora"
    exact = True
    sums_uploads = False

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.base = BaseHistory(self.layers, self.dtype, self.history)

    def round_seed(self, layer_index: int) -> int:
        """Seed of the fresh A for the coming round (same for every client: leading-slice draw)."""
        return (self.seed * 1_000_003 + self.round * 10_007 + layer_index) % (2**63 - 1)

    def _payload(self, client_id: str, rank: int, base_version: int) -> ClientPayload:
        cur, v = self.version, base_version
        if v > cur:
            deltas = [BaseDelta(cur, {n: Dense(self.base.cum[n].clone()) for n in self.layers}, reset=True)]
        else:
            deltas = self.base.choose(v, cur, None, None)
        # the fresh A travels as its seed: the client draws kaiming_a(rank, d_in, seed) itself
        seeds = {n: self.round_seed(i) for i, n in enumerate(self.layers)}
        return ClientPayload(client_id, rank, {n: {} for n in self.layers}, deltas, cur, reset=True,
                             seed=self.round_seed(0), meta={"round": self.round}, a_seeds=seeds)

    def _aggregate(self, updates: list[ClientUpdate], p: list[float], sums: None) -> None:
        # s·B_stack·A_stack with the weights on B's columns: U = [s·p_1B_1, …], V = [A_1; …]
        col = torch.tensor([self.scale * pi for u, pi in zip(updates, p) for _ in range(u.rank)],
                           dtype=self.dtype).unsqueeze(1)
        stacks = {}
        for n in self.layers:
            # Uᵀ stacked by rows (each Bᵢᵀ a block of rows) copies 3× faster than U by columns
            U = torch.cat([u.factors[n]["B"].T for u in updates], 0).mul_(col).T
            stacks[n] = (U, torch.cat([u.factors[n]["A"] for u in updates], 0))
        # folded in place (one pass per layer); a round that would overflow the base (a sustained
        # attack of large in-range updates) raises first and changes nothing
        self.base.fold(self.version + 1, stacks, "stack product")

    def client_change(self, u: ClientUpdate, layer: str) -> list[Term]:
        return [low_rank(self.scale, u.factors[layer]["B"], u.factors[layer]["A"])]  # fresh adapter

    def global_change(self, layer: str) -> list[Term]:
        return [from_delta(self.base.deltas[self.version + 1][layer])]

    def global_delta(self, layer: str) -> Tensor:
        return self.base.cum[layer].clone()

    def _state(self) -> dict:
        return {"base": self.base.state()}

    def _load_state(self, st: dict) -> None:
        self.base.load(st["base"])
