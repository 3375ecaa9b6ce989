"""Client side of the strategy contract: apply a payload to a model, make an update from it.

``apply_payload`` folds the payload's base deltas into the frozen weights, in order (a ``reset``
delta replaces the held base delta: the full delta since ``W0``), then loads or resets the adapter
at the payload's rank and loads the shared head. FedSA payloads carry no B: the client keeps its
own B (and head) — in a long-lived process that is the model itself; across processes the caller
persists ``adapter_state(model)`` and restores it before calling ``apply_payload``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fedlora.lora import lora_layers
from fedlora.strategies import ClientPayload, ClientUpdate, Strategy

#: factor keys each strategy uploads
UPLOAD_KEYS = {"fedavg": ("A", "B"), "fedex": ("A", "B"), "flora": ("A", "B"), "fedsb": ("R",),
               "fedsa": ("A",)}


def apply_payload(model: nn.Module, payload: ClientPayload) -> None:
    layers = lora_layers(model)
    if set(payload.factors) != set(layers):
        raise ValueError(f"payload layers {sorted(payload.factors)} != the model's adapted layers "
                         f"{sorted(layers)}: build the model with the run's LoRA targets")
    tails = payload.frozen or {}
    for bd in payload.base_deltas:
        for name, delta in bd.layers.items():
            layer = layers[name]
            if isinstance(delta, dict):  # a Fed-SB tail core: s·B·M·A with the frozen factors
                f, t = payload.factors[name], tails.get(name)
                if t is not None:
                    layer.sb_tail = (t["B_tail"], t["A_tail"])
                delta = layer.sb_delta(delta["M"], f.get("B"), f.get("A"))
            if bd.reset:
                layer.set_base_delta_(delta)
            else:
                layer.fold_into_base_(delta)
    with torch.no_grad():
        for name, layer in layers.items():
            f = payload.factors[name]
            if payload.reset:
                layer.reset_(payload.rank)
            elif "B" not in f and layer.mode == "lora" and layer.rank != payload.rank:
                layer.reset_(payload.rank)  # FedSA at a new rank: a fresh personal B
            if "R" in f and layer.mode != "sb":
                raise ValueError(f"payload for {name!r} carries R but the layer is in lora mode: "
                                 "inject with LoRAConfig(mode='sb') for fedsb")
            layer.set_factors_(f.get("A"), f.get("B"), f.get("R"))
            if name in tails:  # (after set_factors_: a new rank resets the layer)
                layer.sb_tail = (tails[name]["B_tail"], tails[name]["A_tail"])
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


def make_update(model: nn.Module, client_id: str, num_examples: int, base_version: int,
                strategy_name: str, head_names: list[str] | None = None,
                metrics: dict | None = None) -> ClientUpdate:
    """The update a client uploads: factors per strategy (fedsb: R; fedsa: A; else A, B) + head."""
    if strategy_name not in UPLOAD_KEYS:
        raise ValueError(f"unknown strategy {strategy_name!r}; choose one of {sorted(UPLOAD_KEYS)}")
    keys = UPLOAD_KEYS[strategy_name]
    layers = lora_layers(model)
    ranks = {m.rank for m in layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"adapted layers have different ranks {sorted(ranks)}; one rank per client")
    factors = {n: {k: v for k, v in m.factors().items() if k in keys} for n, m in layers.items()}
    head = None
    if head_names and strategy_name != "fedsa":  # FedSA keeps the head on the client
        head = head_state(model, head_names)
    return ClientUpdate(str(client_id), ranks.pop(), int(num_examples), int(base_version), factors,
                        head, dict(metrics or {}))


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
