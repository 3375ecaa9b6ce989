"""Byte accounting of payloads and updates: every tensor, dtype-aware (one rule for all)."""

from __future__ import annotations

import torch

from fedlora.strategies.deltas import Dense, LowRank, SBCore
from fedlora.strategies.types import BaseDelta, ClientPayload, ClientUpdate

Tensor = torch.Tensor


def tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def nested_bytes(obj) -> int:
    """Bytes of every tensor inside dicts/lists/tuples/deltas/BaseDeltas."""
    if isinstance(obj, Tensor):
        return tensor_bytes(obj)
    if isinstance(obj, Dense | LowRank | SBCore):
        return nested_bytes(obj.tensors())
    if isinstance(obj, BaseDelta):
        return nested_bytes(obj.layers)
    if isinstance(obj, dict):
        return sum(nested_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(nested_bytes(v) for v in obj)
    return 0


def payload_bytes(p: ClientPayload) -> int:
    return nested_bytes(p.factors) + nested_bytes(p.base_deltas) + nested_bytes(p.head) \
        + nested_bytes(p.frozen) + 8 * len(p.a_seeds)  # a seed: one int64


def update_bytes(u: ClientUpdate) -> int:
    """What a client sent: its factors (one buffer when decoded flat) and head."""
    head = nested_bytes(u.head)
    if u.flat is not None:
        return tensor_bytes(u.flat) + head
    return sum(tensor_bytes(t) for f in u.factors.values() for t in f.values()) + head
