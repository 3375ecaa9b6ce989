"""Exports of a run's global model: ``global_delta.safetensors`` and the PEFT adapter folder.

The PEFT adapter splits ``ΔW = W_g − W0`` exactly into a rank-r_max adapter (the top r_max
singular directions, ``s·B·A``) plus the remainder as base deltas beside it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from fedlora.checkpoint import export_peft_adapter
from fedlora.node_cache import atomic_save_safetensors
from fedlora.strategies import Strategy

log = logging.getLogger("fedlora.export")


def split_delta(d: torch.Tensor, scale: float, r: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``d = s·B·A + rest`` with ``B·A`` the best rank-r part (SVD, float64): ``({A, B}, rest)``."""
    U, S, Vh = torch.linalg.svd(d.double(), full_matrices=False)
    sq = S[:r].sqrt()
    B, A = U[:, :r] * sq / math.sqrt(scale), sq[:, None] * Vh[:r] / math.sqrt(scale)
    return {"A": A.float(), "B": B.float()}, (d.double() - scale * B @ A).float()


def export_global(run_dir: Path, strategy: Strategy, targets: list[str], base_model: str,
                  rounds: int) -> str | None:
    """Write ``global_delta.safetensors`` and ``adapter/``; the adapter's path (``None`` if its
    export failed: a finished run is never lost to an export)."""
    deltas = {n: strategy.global_delta(n).float() for n in strategy.layers}
    atomic_save_safetensors(run_dir / "global_delta.safetensors", deltas,
                            {"strategy": strategy.name, "round": str(rounds)})
    factors, rest = {}, {}
    for n, d in deltas.items():
        factors[n], rest[n] = split_delta(d, strategy.scale, strategy.r_max)
    try:
        path = export_peft_adapter(run_dir / "adapter", factors=factors, scale=strategy.scale,
                                   target_modules=targets, base_model=base_model, base_deltas=rest,
                                   head=strategy.global_head(), strategy=strategy.name, round=rounds)
    except Exception as e:  # noqa: BLE001 - the export must not lose a finished run
        log.warning("adapter export failed: %s", e)
        return None
    return str(path)
