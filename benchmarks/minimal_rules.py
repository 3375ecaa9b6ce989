"""The ten aggregation rules written directly in plain torch: the baseline fedlora is timed against.

Each ``minimal_<rule>(state, updates, scale, r_max)`` takes the global state as plain tensors and
the accepted updates (``ClientUpdate``: rank, num_examples, factors) and returns the new state. No
validation, no byte accounting, no versions, no transport forms, no checkpoints: only the rule's
arithmetic, written the way one would write it for a paper's experiment — a loop over layers and
clients, weights ``p_i = n_i / Σn_j``, the dense products as one GEMM of the concatenated factors
(``[p_1B_1 … p_KB_K]·[A_1; …; A_K]``, the fast form) and SVDs of products through QR of the factors
(no d×k SVD). ``dense_state(name, state, scale)`` gives each layer's ``W_g − W0`` (FedSA: its A;
Fed-SB: ``s·B·R·A``) to check fedlora's state against.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def weights(updates) -> list[float]:
    total = float(sum(u.num_examples for u in updates))
    return [u.num_examples / total for u in updates]


def _held(updates, p, r_max: int) -> Tensor:
    held = torch.zeros(r_max, dtype=torch.float64)
    for u, pi in zip(updates, p):
        held[:u.rank] += pi
    return held


def _component_means(old: dict[str, Tensor], updates, p, key: str, cols: bool, r_max: int):
    held = _held(updates, p, r_max)
    shape = (1, -1) if cols else (-1, 1)
    denom = held.clamp_min(1e-300).view(shape)
    mask = (held > 0).view(shape)
    out = {}
    for n, X in old.items():
        acc = torch.zeros_like(X)
        for u, pi in zip(updates, p):
            (acc[:, :u.rank] if cols else acc[:u.rank]).add_(u.factors[n][key], alpha=pi)
        out[n] = torch.where(mask, acc / denom.to(X.dtype), X)
    return out


def _completed_mean(old: dict[str, Tensor], updates, p, key: str) -> dict[str, Tensor]:
    """``Σ p_i X̃_i``: each upload completed by the global components it did not train."""
    out = {}
    for n, X in old.items():
        new = X.clone()
        for u, pi in zip(updates, p):
            sl = (slice(None), slice(0, u.rank)) if key == "B" else (slice(0, u.rank), slice(None))
            new[sl].add_(u.factors[n][key] - X[sl], alpha=pi)
        out[n] = new
    return out


def _stack(updates, p, n: str, scale: float) -> tuple[Tensor, Tensor]:
    U = torch.cat([(scale * pi) * u.factors[n]["B"] for u, pi in zip(updates, p)], 1)
    V = torch.cat([u.factors[n]["A"] for u in updates], 0)
    return U, V


def _svd_of_product(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    Qu, Ru = torch.linalg.qr(U)
    Qv, Rv = torch.linalg.qr(V.T)
    P, S, Qh = torch.linalg.svd((Ru @ Rv.T).double())
    return Qu @ P.to(U.dtype), S.to(U.dtype), Qh.to(U.dtype) @ Qv.T


def minimal_fedavg(st, updates, scale, r_max):
    p = weights(updates)
    return {"A": _component_means(st["A"], updates, p, "A", False, r_max),
            "B": _component_means(st["B"], updates, p, "B", True, r_max)}


def minimal_fedex(st, updates, scale, r_max):
    p = weights(updates)
    A = _component_means(st["A"], updates, p, "A", False, r_max)
    B = _component_means(st["B"], updates, p, "B", True, r_max)
    tails: dict[int, float] = {}
    for u, pi in zip(updates, p):
        if u.rank < r_max:
            tails[u.rank] = tails.get(u.rank, 0.0) + pi
    base = {}
    for n in st["A"]:
        U, V = _stack(updates, p, n, scale)
        Us, Vs = [U, -scale * B[n]], [V, A[n]]
        for r, w in tails.items():  # a rank-r client's base also held its tail s·B[:, r:]·A[r:]
            Us.append(scale * w * st["B"][n][:, r:])
            Vs.append(st["A"][n][r:])
        base[n] = st["base"][n] + torch.cat(Us, 1) @ torch.cat(Vs, 0)
    return {"A": A, "B": B, "base": base}


def minimal_flora(st, updates, scale, r_max):
    p = weights(updates)
    return {"base": {n: st["base"][n] + torch.mm(*_stack(updates, p, n, scale)) for n in st["base"]}}


def minimal_fedsb(st, updates, scale, r_max):
    p = weights(updates)
    R = {}
    for n, old in st["R"].items():
        new = old.clone()
        for u, pi in zip(updates, p):
            new[:u.rank, :u.rank].add_(u.factors[n]["R"] - old[:u.rank, :u.rank], alpha=pi)
        R[n] = new
    return {**st, "R": R}


def minimal_fedsa(st, updates, scale, r_max):
    return {"A": _component_means(st["A"], updates, weights(updates), "A", False, r_max)}


def minimal_ffa(st, updates, scale, r_max):
    return {"A": st["A"], "B": _completed_mean(st["B"], updates, weights(updates), "B")}


def minimal_rolora(st, updates, scale, r_max):
    key = "B" if "B" in updates[0].factors[next(iter(st["A"]))] else "A"  # B and A rounds alternate
    return {**st, key: _completed_mean(st[key], updates, weights(updates), key)}


def minimal_fedsvd(st, updates, scale, r_max):
    B = _completed_mean(st["B"], updates, weights(updates), "B")
    A_new, B_new = {}, {}
    for n in B:
        P, S, Qh = _svd_of_product(B[n], st["A"][n])
        A_new[n], B_new[n] = Qh, P * S
    return {"A": A_new, "B": B_new}


def minimal_flexlora(st, updates, scale, r_max):
    p = weights(updates)
    delta, A, B = {}, {}, {}
    for n in st["delta"]:
        U, V = _stack(updates, p, n, scale)
        delta[n] = U @ V
        P, S, Qh = _svd_of_product(U, V)
        m = min(r_max, S.numel())
        A[n] = st["A0"][n].clone()
        A[n][:m] = Qh[:m]
        B[n] = torch.zeros(U.shape[0], r_max, dtype=U.dtype)
        B[n][:, :m] = P[:, :m] * (S[:m] / scale)
    return {"delta": delta, "A": A, "B": B, "A0": st["A0"]}


def minimal_hetlora(st, updates, scale, r_max):
    # weights ∝ n_i·‖ΔW_i‖ with ‖ΔW_i‖² = Σ_l ‖B_l A_l‖_F² = Σ_l Σ (BᵀB)∘(AAᵀ)
    raw = []
    for u in updates:
        sq = sum(float(((f["B"].double().T @ f["B"].double()) * (f["A"].double() @ f["A"].double().T)).sum())
                 for f in u.factors.values())
        raw.append(u.num_examples * math.sqrt(max(sq, 0.0)))
    total = math.fsum(raw)
    p = [x / total for x in raw]
    held = _held(updates, p, r_max) > 0
    A, B = {}, {}
    for n in st["A"]:
        accA, accB = torch.zeros_like(st["A"][n]), torch.zeros_like(st["B"][n])
        for u, pi in zip(updates, p):
            accA[:u.rank].add_(u.factors[n]["A"], alpha=pi)
            accB[:, :u.rank].add_(u.factors[n]["B"], alpha=pi)
        A[n] = torch.where(held.view(-1, 1), accA, st["A"][n])
        B[n] = torch.where(held.view(1, -1), accB, st["B"][n])
    return {"A": A, "B": B}


MINIMAL = {name[len("minimal_"):]: f for name, f in globals().items() if name.startswith("minimal_")}


def state_of(s, clone: bool = True) -> dict[str, dict[str, Tensor]]:
    """A fedlora strategy's global state as the plain tensors the minimal rules take (copies, or
    the strategy's own tensors with ``clone=False``)."""
    st = {}
    for key in ("A", "B", "R", "A0", "delta"):
        if isinstance(getattr(s, key, None), dict):
            st[key] = {n: t.clone() if clone else t for n, t in getattr(s, key).items()}
    if hasattr(s, "base"):
        st["base"] = {n: t.clone() if clone else t for n, t in s.base.cum.items()}
    return st


def fingerprint(name: str, st: dict, x: Tensor, y: Tensor, scale: float) -> float:
    """``Σ_l xᵀ·(W_g − W0)_l·y`` (FedSA: ``x[:r]ᵀ·A_l·y``) without forming a dense matrix."""
    total = 0.0
    for n in next(iter(st.values())):
        if name == "fedsa":
            total += float(x[:st["A"][n].shape[0]] @ st["A"][n] @ y)
        elif name == "fedsb":
            total += scale * float((x @ st["B"][n]) @ st["R"][n] @ (st["A"][n] @ y))
        elif name in ("flora", "flexlora"):
            total += float(x @ st["base" if name == "flora" else "delta"][n] @ y)
        else:
            total += scale * float((x @ st["B"][n]) @ (st["A"][n] @ y))
            if "base" in st:
                total += float(x @ st["base"][n] @ y)
    return total


def dense_state(name: str, st: dict, scale: float) -> dict[str, Tensor]:
    """Each layer's ``W_g − W0`` (FedSA: A; Fed-SB: ``s·B·R·A``) from a state of ``state_of``'s form."""
    if name == "fedsa":
        return st["A"]
    if name == "fedsb":
        return {n: scale * st["B"][n] @ st["R"][n] @ st["A"][n] for n in st["R"]}
    if name in ("flora", "flexlora"):
        return st["base"] if name == "flora" else st["delta"]
    out = {n: scale * st["B"][n] @ st["A"][n] for n in st["A"]}
    if "base" in st:
        out = {n: out[n] + st["base"][n] for n in out}
    return out
