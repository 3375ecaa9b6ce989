"""The exactness diagnostic without a dense matrix per client.

    error = ‖W_g(new) − Σ p_i W_i‖_F / ‖Σ p_i W_i − W_g(old)‖_F      (summed over layers)

A strategy states, per layer, ``W_i − W_g(old)`` for each accepted update (``client_change``,
before it aggregates) and ``W_g(new) − W_g(old)`` (``global_change``, after) as **terms**
``c·U·V`` (low rank) or ``c·D`` (dense). Both norms are then norms of sums of terms. Terms on the
same tensors are merged first (the old global factors appear in every client's change: they
cancel instead of adding rank), then, one layer at a time:

- low total rank ρ (``2.5·ρ(d+k) < d·k``): ``X = U·V`` with the stacked factors; ``U = Q·R_U`` (QR),
  and ``‖X‖_F = ‖R_U·V‖_F`` — O(ρ(d+k)) memory, O(ρ²(d+k)) time, no squaring of the condition;
- otherwise the dense ``X`` of that one layer (O(dk) memory, one GEMM of rank ρ).

So memory is O(min(ρ(d+k), dk)) per layer (never K dense copies), and an exact strategy's ~1e-16
error is computed as such (a Gram form ``tr((UᵀU)(VVᵀ))`` would lose half the digits).
Cost: the error of FedAvg is bilinear in the uploads (``Σ p_i B_i A_i``), so any exact diagnostic
costs at least a GEMM of rank ``Σ r_i`` per layer — several times FedAvg's memory-bound sums (see
``benchmarks/exactness_cost.py``); ``strategy.check_exactness = false`` switches it off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class Term:
    """``c·U·V`` (``V`` given) or ``c·U`` (dense, ``V is None``)."""

    c: float
    U: Tensor
    V: Tensor | None = None


def low_rank(c: float, U: Tensor, V: Tensor) -> Term:
    return Term(float(c), U, V)


def dense(c: float, D: Tensor) -> Term:
    return Term(float(c), D)


def merge(terms: list[Term]) -> list[Term]:
    """Add the coefficients of terms on the same tensors; drop those that cancel."""
    acc: dict[tuple[int, int], Term] = {}
    for t in terms:
        key = (id(t.U), id(t.V))
        if key in acc:
            acc[key] = Term(acc[key].c + t.c, t.U, t.V)
        else:
            acc[key] = Term(t.c, t.U, t.V)
    out = list(acc.values())
    big = max((abs(t.c) for t in out), default=0.0)
    out = [t for t in out if abs(t.c) > 1e-13 * big]
    # terms on one shared U (Fed-SB's frozen B) are one term: Σ c_j·U·V_j = U·(Σ c_j·V_j)
    by_u: dict[int, list[Term]] = {}
    for t in out:
        by_u.setdefault(id(t.U) if t.V is not None else -id(t), []).append(t)
    merged = []
    for group in by_u.values():
        if len(group) == 1 or len({tuple(t.V.shape) for t in group}) != 1:
            merged += group
            continue
        V = group[0].V * group[0].c
        for t in group[1:]:
            V = V.add(t.V, alpha=t.c)
        merged.append(Term(1.0, group[0].U, V))
    return merged


def from_delta(d) -> Term:
    """A base step (``deltas.LowRank`` or ``deltas.Dense``) as a term."""
    return Term(1.0, d.U, d.V) if hasattr(d, "V") else Term(1.0, d.to_dense())


def frobenius(terms: list[Term]) -> float:
    """``‖Σ terms‖_F`` (see the module docstring for the two paths)."""
    terms = merge(terms)
    if not terms:
        return 0.0
    dense_terms = [t for t in terms if t.V is None]
    lr = [t for t in terms if t.V is not None]
    d = terms[0].U.shape[0]
    k = dense_terms[0].U.shape[1] if dense_terms else lr[0].V.shape[1]
    rho = sum(t.U.shape[1] for t in lr)
    if not dense_terms and rho * (d + k) < d * k:
        U = torch.cat([t.U * t.c for t in lr], 1)
        V = torch.cat([t.V for t in lr], 0)
        _, R = torch.linalg.qr(U, mode="r")
        return float(torch.linalg.matrix_norm(R @ V))  # U = Q·R, Q orthonormal columns
    X = None
    for t in dense_terms:
        X = t.U * t.c if X is None else X.add_(t.U, alpha=t.c)
    if lr:
        P = torch.cat([t.U * t.c for t in lr], 1) @ torch.cat([t.V for t in lr], 0)
        X = P if X is None else X.add_(P)
    return float(torch.linalg.matrix_norm(X))


def _sum_dense(terms: list[Term], shape: tuple[int, int], like: Tensor) -> Tensor:
    X = torch.zeros(shape, dtype=like.dtype)
    lr = [t for t in terms if t.V is not None]
    for t in terms:
        if t.V is None:
            X.add_(t.U, alpha=t.c)
    if lr:
        X.addmm_(torch.cat([t.U * t.c for t in lr], 1), torch.cat([t.V for t in lr], 0))
    return X


def layer_norms(change: list[Term], target: list[Term]) -> tuple[float, float]:
    """``(‖change − target‖_F, ‖target‖_F)`` of one layer, sharing the work of both.

    Small total rank: one QR of all the distinct left factors, both norms from its R. Otherwise:
    the dense target once (one GEMM), the change added to it. QR costs about 2.5× a GEMM per flop
    here, hence the threshold ``2.5·ρ(d+k) < d·k``.
    """
    target = merge(target)
    diff = merge(change + [Term(-t.c, t.U, t.V) for t in target])
    every = target + diff
    if not every:
        return 0.0, 0.0
    t0 = every[0]
    d = t0.U.shape[0]
    k = t0.V.shape[1] if t0.V is not None else t0.U.shape[1]
    lr_t = [t for t in target if t.V is not None]
    lr_d = [t for t in diff if t.V is not None]
    rho = sum(t.U.shape[1] for t in lr_t + lr_d)
    if len(lr_t) == len(target) and len(lr_d) == len(diff) and 2.5 * rho * (d + k) < d * k:
        U = torch.cat([t.U * t.c for t in lr_t + lr_d], 1)
        _, R = torch.linalg.qr(U, mode="r")  # U = Q·R, Q orthonormal: ‖Q·R·V‖ = ‖R·V‖
        split = sum(t.U.shape[1] for t in lr_t)
        def norm(part, cols):
            return float(torch.linalg.matrix_norm(cols @ torch.cat([t.V for t in part], 0))) if part else 0.0
        return norm(lr_d, R[:, split:]), norm(lr_t, R[:, :split])
    # dense: the target once, then the change on top (change − target = −(target − change))
    T = _sum_dense(target, (d, k), t0.U)
    den = float(torch.linalg.matrix_norm(T))
    E = _sum_dense(merge(change), (d, k), t0.U).sub_(T)
    return float(torch.linalg.matrix_norm(E)), den


def aggregation_error(change: dict[str, list[Term]], clients: list[dict[str, list[Term]]],
                      p: list[float]) -> float:
    """``‖change − Σ p_i client_i‖ / ‖Σ p_i client_i‖`` over all layers (``‖num‖`` alone when the
    round changed nothing)."""
    num = den = 0.0
    for n, ch in change.items():
        target = [Term(pi * t.c, t.U, t.V) for c, pi in zip(clients, p) for t in c[n]]
        a, b = layer_norms(ch, target)
        num, den = num + a * a, den + b * b
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)
