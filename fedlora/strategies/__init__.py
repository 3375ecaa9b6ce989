"""Aggregation strategies: pure torch objects, no Flower import (see base.py for the contract)."""

from __future__ import annotations

import torch

from fedlora.strategies.base import (
    BaseDelta,
    ClientPayload,
    ClientUpdate,
    LayerSpec,
    RoundReport,
    Strategy,
)
from fedlora.strategies.fedavg import FedAvg
from fedlora.strategies.fedex import FedEx
from fedlora.strategies.fedsa import FedSA
from fedlora.strategies.fedsb import FedSB
from fedlora.strategies.flora import FLoRA

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedex": FedEx,
    "flora": FLoRA,
    "fedsb": FedSB,
    "fedsa": FedSA,
}


def create_strategy(name: str, *, layers: dict[str, LayerSpec], r_max: int, scale: float,
                    weighting: str = "samples", seed: int = 0, dtype: torch.dtype = torch.float32,
                    **kw) -> Strategy:
    """Build a strategy by name (``fedavg``, ``fedex``, ``flora``, ``fedsb``, ``fedsa``)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](layers, r_max, scale, weighting=weighting, seed=seed, dtype=dtype, **kw)


__all__ = ["STRATEGIES", "BaseDelta", "ClientPayload", "ClientUpdate", "LayerSpec", "RoundReport",
           "Strategy", "create_strategy"]
