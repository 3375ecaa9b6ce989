"""Aggregation strategies: pure torch objects, no Flower import.

``base.py`` is the contract; one file per rule, each registering itself with
``@register_strategy``. ``create_strategy(name, ...)`` builds any registered rule, the built-in
ones and those a user registers (``register_strategy``, config ``strategy.plugins``).
"""

from __future__ import annotations

import importlib

import torch

from fedlora.strategies.base import Strategy
from fedlora.strategies.defences import NormBound
from fedlora.strategies.deltas import Delta, Dense, LowRank, SBCore
from fedlora.strategies.registry import (
    _REGISTRY,
    load_plugin,
    register_strategy,
    strategy_class,
    strategy_names,
)
from fedlora.strategies.types import BaseDelta, ClientPayload, ClientUpdate, LayerSpec, RoundReport

# the built-in rules register themselves on import; the order is the CLI's and compare's order
BUILTIN = ("fedavg", "fedex", "flora", "fedsb", "fedsa", "ffa", "rolora", "fedsvd", "flexlora", "hetlora")
for _name in BUILTIN:
    importlib.import_module(f"fedlora.strategies.{_name}")

#: every registered strategy by name (live: strategies registered later appear here too)
STRATEGIES = _REGISTRY


def create_strategy(name: str, *, layers: dict[str, LayerSpec], r_max: int, scale: float,
                    weighting: str = "samples", seed: int = 0, dtype: torch.dtype = torch.float32,
                    **kw) -> Strategy:
    """Build a registered strategy by name (``strategy_names()`` lists them)."""
    return strategy_class(name)(layers, r_max, scale, weighting=weighting, seed=seed, dtype=dtype, **kw)


__all__ = ["STRATEGIES", "BaseDelta", "ClientPayload", "ClientUpdate", "Delta", "Dense", "LayerSpec",
           "LowRank", "NormBound", "RoundReport", "SBCore", "Strategy", "create_strategy", "load_plugin",
           "register_strategy", "strategy_class", "strategy_names"]
