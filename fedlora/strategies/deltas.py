"""Base deltas in the form they travel: dense, low-rank ``U·V``, or a Fed-SB core.

Each is a small class with ``to_dense()`` (d×k, nn.Linear orientation), ``numel()`` (numbers on
the wire) and ``tensors()`` (its tensors by wire key), so payload building, byte accounting, the
wire format and checkpoints never test what kind of delta they hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class Dense:
    D: Tensor

    def to_dense(self) -> Tensor:
        return self.D

    def numel(self) -> int:
        return self.D.numel()

    def tensors(self) -> dict[str, Tensor]:
        return {"D": self.D}


@dataclass
class LowRank:
    """``U·V`` with ``U`` d×ρ and ``V`` ρ×k."""

    U: Tensor
    V: Tensor

    def to_dense(self) -> Tensor:
        return self.U @ self.V

    def numel(self) -> int:
        return self.U.numel() + self.V.numel()

    def tensors(self) -> dict[str, Tensor]:
        return {"U": self.U, "V": self.V}


@dataclass
class SBCore:
    """A Fed-SB tail change ``s·B_full·M·A_full`` sent as its r_max×r_max core ``M``: the client
    expands it with the frozen factors it holds (``LoRALinear.sb_delta``)."""

    M: Tensor

    def to_dense(self) -> Tensor:
        raise ValueError("an SBCore needs the client's frozen factors: expand it with "
                         "LoRALinear.sb_delta")

    def numel(self) -> int:
        return self.M.numel()

    def tensors(self) -> dict[str, Tensor]:
        return {"M": self.M}


Delta = Dense | LowRank | SBCore


def from_tensors(t: dict[str, Tensor]) -> Delta:
    """Inverse of ``delta.tensors()`` (the wire and checkpoint form)."""
    if set(t) == {"D"}:
        return Dense(t["D"])
    if set(t) == {"U", "V"}:
        return LowRank(t["U"], t["V"])
    if set(t) == {"M"}:
        return SBCore(t["M"])
    raise ValueError(f"a base delta carries D, U+V or M; got keys {sorted(t)}")


def cheapest(U: Tensor, V: Tensor) -> Delta:
    """``U·V`` as factors when ``ρ(d+k) < d·k`` numbers, else dense (formed only then)."""
    if U.shape[1] * (U.shape[0] + V.shape[1]) < U.shape[0] * V.shape[1]:
        return LowRank(U.contiguous(), V.contiguous())
    return Dense(U @ V)
