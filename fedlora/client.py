"""Client side of the strategy contract: apply a payload to a model, make an update from it.

``apply_payload`` folds the payload's base deltas into the frozen weights, in order (a ``reset``
delta replaces the held base delta: the full delta since ``W0``), loads or resets the adapter at
the payload's rank, loads the shared head and freezes every factor the payload does not train.
``make_update`` uploads what the payload asks for (``payload.uploads``, the head if
``payload.upload_head``). Both read only the payload: a client needs no strategy code, so a rule
registered on the server alone runs on every client. FedSA payloads carry no B: the client keeps
its own B (and head) — in a long-lived process that is the model itself; across processes the
caller persists ``adapter_state(model)`` and restores it before calling ``apply_payload``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fedlora.lora import LoRALinear, kaiming_a, lora_layers
from fedlora.strategies import ClientPayload, ClientUpdate, Dense, LowRank, SBCore, Strategy
from fedlora.strategies.types import SEED_DTYPES

_FACTOR_MODULES = {"A": "lora_a", "B": "lora_b", "R": "lora_r"}


def _fold_form(layer: LoRALinear, delta, payload: ClientPayload, name: str):
    """A payload delta in the form ``LoRALinear`` folds: dense, or ``(U, V)``."""
    if isinstance(delta, SBCore):  # s·B·M·A with the layer's frozen factors
        f = payload.factors[name]
        return layer.sb_delta(delta.M, f.get("B"), f.get("A"))
    if isinstance(delta, LowRank):
        return delta.U, delta.V
    if isinstance(delta, Dense):
        return delta.D
    raise ValueError(f"layer {name!r}: unknown base delta {type(delta).__name__}")


def apply_payload(model: nn.Module, payload: ClientPayload) -> None:
    layers = lora_layers(model)
    if set(payload.factors) != set(layers):
        raise ValueError(f"payload layers {sorted(payload.factors)} != the model's adapted layers "
                         f"{sorted(layers)}: build the model with the run's LoRA targets")
    tails = payload.frozen or {}
    for bd in payload.base_deltas:
        for name, delta in bd.layers.items():
            layer = layers[name]
            if name in tails:
                layer.sb_tail = (tails[name]["B_tail"], tails[name]["A_tail"])
            d = _fold_form(layer, delta, payload, name)
            if bd.reset:
                layer.set_base_delta_(d)
            else:
                layer.fold_into_base_(d)
    with torch.no_grad():
        for name, layer in layers.items():
            f = payload.factors[name]
            if payload.reset:
                layer.reset_(payload.rank)
            elif "B" not in f and layer.mode == "lora" and layer.rank != payload.rank:
                layer.reset_(payload.rank)  # FedSA at a new rank: a fresh personal B
            if "R" in f and layer.mode != "sb":
                raise ValueError(f"payload for {name!r} carries R but the layer is in lora mode: "
                                 "inject with the strategy's adapter kind (LoRAConfig(mode='sb'))")
            A = f.get("A")
            if name in payload.a_seeds:  # the server sent A's seed, not A
                if A is not None:
                    raise ValueError(f"payload for {name!r} carries both A and A's seed")
                A = kaiming_a(payload.rank, layer.in_features, payload.a_seeds[name],
                              SEED_DTYPES[payload.a_seed_dtype])  # as the server drew it; cast below
            layer.set_factors_(A, f.get("B"), f.get("R"))
            if name in tails:  # (after set_factors_: a new rank resets the layer)
                layer.sb_tail = (tails[name]["B_tail"], tails[name]["A_tail"])
            for key, attr in _FACTOR_MODULES.items():
                if (lin := getattr(layer, attr)) is not None:
                    lin.weight.requires_grad_(key in payload.trains)
        if payload.head is not None:
            for pname, t in payload.head.items():
                p = model.get_parameter(pname)
                p.copy_(t.to(p.dtype))


class RankSelfPruning:
    """Local rank self-pruning, as a payload asks for it (``prune_to``, ``tail_penalty``; HetLoRA,
    arXiv 2401.06432 — but any rule may ask, the client never needs to know which).

    With ``r' = payload.prune_to`` (0 < r' < rank) the *tail* of each adapted layer is its
    components beyond r': ``B_t = B[:, r':]``, ``A_t = A[r':]``. During local training the penalty
    ``R = λ·Σ_l ‖B_{t,l}‖_F·‖A_{t,l}‖_F`` (λ = ``payload.tail_penalty``) is applied as a decoupled
    step before each optimizer step (``before_step``: ``θ ← θ − lr·∇R(θ)`` on the trained factors,
    the gradient taken at the same point as the loss's), which with SGD is exactly a step on the
    penalised loss and, like AdamW's weight decay, stays out of the optimizer's normalisation — and
    out of DP-SGD's per-sample clipping and noise (R does not depend on the data). After training
    (``finish``) the client drops the tail, so its update has rank r', when ``Σ_l ‖B_t‖·‖A_t‖`` is
    smaller than at the start of the round.
    """

    def __init__(self, model: nn.Module, payload: ClientPayload) -> None:
        self.layers = lora_layers(model)
        self.keep, self.lam = int(payload.prune_to), float(payload.tail_penalty)
        self.start = self.tail_norm()

    @classmethod
    def from_payload(cls, model: nn.Module, payload: ClientPayload) -> RankSelfPruning | None:
        """The payload's pruning rule for ``model`` (after ``apply_payload``), ``None`` without one."""
        return cls(model, payload) if 0 < payload.prune_to < payload.rank else None

    def tail_norm(self) -> float:
        """``Σ_l ‖B_l[:, r':]‖_F·‖A_l[r':]‖_F``."""
        with torch.no_grad():
            return sum(float(m.lora_b.weight[:, self.keep:].norm() * m.lora_a.weight[self.keep:].norm())
                       for m in self.layers.values())

    @torch.no_grad()
    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.lam == 0:
            return
        lr = float(optimizer.param_groups[0]["lr"])
        for m in self.layers.values():
            B, A = m.lora_b.weight, m.lora_a.weight
            Bt, At = B[:, self.keep:], A[self.keep:]
            nb, na = Bt.norm(), At.norm()
            # ∂R/∂B_t = λ‖A_t‖·B_t/‖B_t‖, ∂R/∂A_t = λ‖B_t‖·A_t/‖A_t‖ (0 where a norm is 0), both at θ
            gB = Bt * (self.lam * na / nb) if nb > 0 else None
            gA = At * (self.lam * nb / na) if na > 0 else None
            if gB is not None and B.requires_grad:
                Bt.sub_(gB, alpha=lr)
            if gA is not None and A.requires_grad:
                At.sub_(gA, alpha=lr)

    def finish(self) -> int:
        """Prune if the tail shrank during the round; the adapter's rank afterwards."""
        if self.tail_norm() < self.start:
            with torch.no_grad():
                for m in self.layers.values():
                    k = self.keep
                    m.set_factors_(m.lora_a.weight[:k].clone(), m.lora_b.weight[:, :k].clone())
        return next(iter(self.layers.values())).rank


def head_state(model: nn.Module, head_names: list[str]) -> dict[str, torch.Tensor]:
    """Parameters of the named head modules, by full parameter name (detached copies)."""
    out = {}
    for m in head_names:
        for pname, p in model.get_submodule(m).named_parameters():
            out[f"{m}.{pname}"] = p.detach().clone()
    return out


def make_update(model: nn.Module, payload: ClientPayload, num_examples: int,
                head_names: list[str] | None = None, metrics: dict | None = None) -> ClientUpdate:
    """The update for ``payload``: the factors it asks for (``payload.uploads``) and the head."""
    layers = lora_layers(model)
    ranks = {m.rank for m in layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"adapted layers have different ranks {sorted(ranks)}; one rank per client")
    keys = set(payload.uploads)
    factors = {n: {k: v for k, v in m.factors().items() if k in keys} for n, m in layers.items()}
    head = head_state(model, head_names) if head_names and payload.upload_head else None
    return ClientUpdate(payload.client_id, ranks.pop(), int(num_examples), int(payload.base_version),
                        factors, head, dict(metrics or {}))


def load_global(model: nn.Module, strategy: Strategy) -> None:
    """Put the global model into ``model``: base delta = global delta, adapter contributes 0."""
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.set_base_delta_(strategy.global_delta(name))
            layer.lora_b.weight.zero_()
            if layer.lora_r is not None:
                layer.lora_r.weight.zero_()
        head = strategy.global_head()
        for pname, t in (head or {}).items():
            model.get_parameter(pname).copy_(t)
