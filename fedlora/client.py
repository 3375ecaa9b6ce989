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

from fedlora.lora import LoRALinear, lora_layers
from fedlora.strategies import ClientPayload, ClientUpdate, Dense, LowRank, SBCore, Strategy

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
            layer.set_factors_(f.get("A"), f.get("B"), f.get("R"))
            if name in tails:  # (after set_factors_: a new rank resets the layer)
                layer.sb_tail = (tails[name]["B_tail"], tails[name]["A_tail"])
            for key, attr in _FACTOR_MODULES.items():
                if (lin := getattr(layer, attr)) is not None:
                    lin.weight.requires_grad_(key in payload.trains)
        if payload.head is not None:
            for pname, t in payload.head.items():
                p = model.get_parameter(pname)
                p.copy_(t.to(p.dtype))


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
