"""Shared helpers for the strategy tests: a small float64 model of LoRALinear layers."""

from __future__ import annotations

import torch
import torch.nn as nn

from fedlora.client import apply_payload, make_update
from fedlora.lora import LoRALinear, effective_weight, lora_layers
from fedlora.strategies import LayerSpec

SHAPES = {"enc.q": (6, 5), "enc.v": (7, 4), "dec.o": (5, 8)}  # non-square: a transpose cannot pass


class Multi(nn.Module):
    """Several independent adapted layers (enough for the contracts; no forward needed)."""

    def __init__(self, seed: int, rank: int, scale: float, mode: str, dtype=torch.float64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.enc = nn.Module()
        self.dec = nn.Module()
        for name, (d, k) in SHAPES.items():
            parent, child = name.split(".")
            lin = nn.Linear(k, d, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(d, k, generator=g, dtype=dtype))
            setattr(getattr(self, parent), child, LoRALinear(lin, rank, scale, mode=mode))


def layer_specs() -> dict[str, LayerSpec]:
    return {n: LayerSpec(d, k) for n, (d, k) in SHAPES.items()}


def w0(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.base.weight.detach().clone() for n, m in lora_layers(model).items()}


def train_randomly(model: nn.Module, gen: torch.Generator, strategy: str | None = None) -> None:
    """Stand-in for local training: move every factor the payload left trainable, randomly."""
    with torch.no_grad():
        for m in lora_layers(model).values():
            for lin in (m.lora_a, m.lora_b, m.lora_r):
                if lin is not None and lin.weight.requires_grad:
                    lin.weight.add_(torch.randn(lin.weight.shape, generator=gen, dtype=lin.weight.dtype))


def state_tensors(strategy) -> dict[str, torch.Tensor]:
    """Every tensor in a strategy's state_dict, by path (copies): to compare states."""
    out = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj.clone()
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)

    walk("", strategy.state_dict())
    return out


def effective(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: effective_weight(model, n) for n in SHAPES}


__all__ = ["Multi", "SHAPES", "apply_payload", "effective", "layer_specs", "make_update",
           "state_tensors", "train_randomly", "w0"]
