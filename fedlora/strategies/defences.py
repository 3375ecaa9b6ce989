"""What keeps one client from taking over or wrecking a round, the same for every rule.

- ``capped_weights``: no client's share of a round's weight above ``max_weight_share``;
- ``magnitude_limit`` / ``in_range``: an update whose factors could make an aggregate or a product
  overflow the server's dtype is rejected alone (naming the client and the layer);
- ``NormBound`` / ``norm_bounded``: an optional bound on the updates' norms (reject or clip);
- ``require_finite``: the last safety net on a rule's dense products (a round that would still
  write ∞ into the state is rejected whole, before any change).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedlora.strategies.types import ClientUpdate
from fedlora.strategies.validation import nonfinite_reason

Tensor = torch.Tensor


class NonFiniteAggregate(ValueError):
    """Finite uploads whose aggregate overflows the server's dtype: the round is rejected whole."""


def overflow_reason(what: str, dtype: torch.dtype) -> str:
    return (f"the {what} overflows {dtype}: factors this large are a diverged client; lower the "
            "learning rate or clip the updates")


def require_finite(dense: dict[str, Tensor], what: str, dtype: torch.dtype) -> None:
    """Raise ``NonFiniteAggregate`` unless every layer's tensor is finite (before any state change)."""
    # a sum is 20× cheaper than isfinite().all() and non-finite whenever an entry is
    bad = [n for n, t in dense.items()
           if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteAggregate(overflow_reason(f"{what} of layer {bad[0]!r}", dtype))


def magnitude_limit(dtype: torch.dtype, k: int, scale: float) -> float:
    """The largest Frobenius norm an uploaded factor may have in a round of ``k`` updates.

    With every factor ``‖X‖ ≤ L = √max / (4·(k+2)·max(1, s))`` (max: the dtype's largest
    number), every weighted sum of ``k`` updates is below ``L``, and every product a rule forms
    from them (``s·B·A``, FedEx's residual, FLoRA's stack, ``s·B·R·A``) below ``max/16``: no
    round's aggregate can overflow, whichever rule runs. (What accumulates over many rounds, the
    folded base of FedEx / FLoRA, is checked by ``require_finite`` before it is written.)
    """
    return math.sqrt(torch.finfo(dtype).max) / (4 * (k + 2) * max(1.0, scale))


def in_range(updates: list[ClientUpdate], limit: float, dtype: torch.dtype,
             rejected: dict[str, str]) -> list[ClientUpdate]:
    """The updates whose factors are finite and within ``limit``; the others get their reason."""
    keep = []
    for u in updates:
        ts = [u.flat] if u.flat is not None else [t for f in u.factors.values() for t in f.values()]
        ts += list((u.head or {}).values())  # the head is averaged too
        norm = float(torch.stack(torch._foreach_norm(ts)).norm()) if ts else 0.0  # (inf: rejected)
        if norm <= limit:  # (False for NaN)
            keep.append(u)
            continue
        reason = nonfinite_reason(u)
        if reason is None:
            what, big = max([(f"layer {n!r} factor {k}", float(t.double().norm()))
                             for n, f in u.factors.items() for k, t in f.items()]
                            + [(f"head {k!r}", float(t.double().norm())) for k, t in (u.head or {}).items()],
                            key=lambda x: x[1])
            reason = (f"{what}: norm {big:.3g} beyond {limit:.3g}, the most this round's aggregate "
                      f"can take without overflowing {dtype}: a diverged or hostile client")
        rejected[u.client_id] = reason
    return keep


def capped_weights(p: list[float], cap: float) -> list[float]:
    """``p`` with no share above ``cap``: shares above it are cut to it and the rest renormalised,
    until none is above (water-filling); a cap below ``1/K`` cannot hold: uniform is the closest."""
    if cap >= 1.0:
        return p
    if cap * len(p) < 1.0:
        return [1.0 / len(p)] * len(p)
    capped: set[int] = set()
    while True:
        free = 1.0 - cap * len(capped)
        rest = sum(pi for i, pi in enumerate(p) if i not in capped)
        q = [cap if i in capped else pi * free / rest for i, pi in enumerate(p)]
        over = {i for i, qi in enumerate(q) if qi > cap * (1 + 1e-12) and i not in capped}
        if not over:
            return q
        capped |= over


def _sent_part(sent: Tensor | None, t: Tensor) -> Tensor | None:
    """What the client was sent for the factor it uploads as ``t``: the same tensor, or its leading
    slice when ``t`` has a lower rank (a client that pruned its rank: HetLoRA); ``None`` when
    nothing comparable was sent."""
    if sent is None or sent.dim() != t.dim():
        return None
    if sent.shape == t.shape:
        return sent
    if all(a >= b for a, b in zip(sent.shape, t.shape)):
        return sent[tuple(slice(0, b) for b in t.shape)]
    return None


@dataclass(frozen=True)
class NormBound:
    """An optional defence against outsized updates (off by default).

    An update's size is its parameter-space change ``‖X_i − X_sent‖_F`` over every factor and head
    tensor it uploads (``X_sent``: what its payload gave it; zero for a factor the payload did not
    carry, e.g. FLoRA's fresh B). The bound is ``min(multiple · median size of the round, absolute)``
    (a 0 leaves that term out). ``mode = "reject"`` drops the updates above it; ``"clip"`` scales
    their change down to it (``X_sent + c·(X_i − X_sent)``: exact for rules linear in the uploaded
    factor, a shrink of ``B·A`` for those that upload both). It does not catch a poisoned update
    that stays within the bound.
    """

    mode: str = "off"  # off | reject | clip
    multiple: float = 0.0
    absolute: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("off", "reject", "clip"):
            raise ValueError(f"norm bound mode must be 'off', 'reject' or 'clip', got {self.mode!r}")
        if self.multiple < 0 or self.absolute < 0 or (self.mode != "off"
                                                      and not (self.multiple or self.absolute)):
            raise ValueError("norm bound: give multiple (of the round's median) and/or absolute, "
                             "both >= 0")

    def apply(self, updates: list[ClientUpdate], given: dict[str, dict[str, dict[str, Tensor]]],
              rejected: dict[str, str],
              given_head: dict[str, dict[str, Tensor]] | None = None) -> list[ClientUpdate]:
        """The updates within the bound, clipped ones included (``given``: the factors each was
        sent; ``given_head``: the head each was sent)."""
        if self.mode == "off" or not updates:
            return updates
        sizes = []
        refs = []
        for u in updates:
            g = given.get(u.client_id, {})
            ref = {n: {k: _sent_part(g.get(n, {}).get(k), t) for k, t in f.items()}
                   for n, f in u.factors.items()}
            gh = (given_head or {}).get(u.client_id, {})
            href = {k: _sent_part(gh.get(k), t) for k, t in (u.head or {}).items()}
            pairs = [(t, ref[n][k]) for n, f in u.factors.items() for k, t in f.items()]
            pairs += [(t, href[k]) for k, t in (u.head or {}).items()]
            sq = sum(float((t.double() - r.double()).pow(2).sum()) if r is not None
                     else float(t.double().pow(2).sum()) for t, r in pairs)
            sizes.append(math.sqrt(sq))
            refs.append((ref, href))
        # a zero median (clients echoing their payload) bounds at 0: only unchanged updates pass
        bound = min((b for b in (self.multiple * sorted(sizes)[(len(sizes) - 1) // 2], self.absolute)
                     if b > 0), default=0.0)
        out = []
        for u, size, (ref, href) in zip(updates, sizes, refs):
            if size <= bound:
                out.append(u)
            elif self.mode == "reject":
                rejected[u.client_id] = (
                    f"update norm {size:.4g} above the norm bound {bound:.4g} (strategy.norm_bound_"
                    f"multiple={self.multiple}, strategy.norm_bound_absolute={self.absolute})")
            else:
                c = bound / size

                def shrink(t: Tensor, r: Tensor | None, c: float = c) -> Tensor:
                    return r + c * (t - r) if r is not None else c * t

                factors = {n: {k: shrink(t, ref[n][k]) for k, t in f.items()} for n, f in u.factors.items()}
                head = None if u.head is None else {k: shrink(t, href[k]) for k, t in u.head.items()}
                out.append(ClientUpdate(u.client_id, u.rank, u.num_examples, u.base_version, factors,
                                        head, {**u.metrics, "clipped_by": c}))
        return out
