"""The one validator of client updates: structure first, values after (nothing is trusted).

``UpdateValidator.check(u, version)`` returns ``(reason, None)`` for an update that must be
rejected, or ``(None, clean)`` with the factors as tensors of the server's dtype. An update
decoded as one flat buffer (``ClientUpdate.flat``) is checked in bulk: its layout against the
declared rank, its factors read as views of the buffer. Finiteness is not checked here per tensor
(see ``nonfinite_reason`` and ``Strategy.aggregate``: a finite weighted sum clears a whole group).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from fedlora.strategies.types import ClientUpdate, Factors, LayerSpec

Tensor = torch.Tensor


def factor_shape(key: str, spec: LayerSpec, r: int) -> tuple[int, int]:
    return {"A": (r, spec.d_in), "B": (spec.d_out, r), "R": (r, r)}[key]


class UpdateValidator:
    def __init__(self, name: str, layers: dict[str, LayerSpec], r_max: int, uploads: frozenset[str],
                 dtype: torch.dtype, weighting: str, shares_head: bool) -> None:
        self.name, self.layers, self.r_max, self.dtype = name, layers, r_max, dtype
        self.keys = sorted(uploads)
        self.weighting, self.shares_head = weighting, shares_head
        self._layouts: dict[int, list[tuple[str, str, tuple[int, int]]]] = {}
        self._sized: dict[int, list[tuple[str, str, torch.Size]]] = {}  # the same, shapes as torch.Size

    def use_keys(self, keys: Iterable[str]) -> None:
        """Check updates for these factor keys from now on (a rule may alternate them by round)."""
        keys = sorted(keys)
        if keys != self.keys:
            self.keys, self._layouts, self._sized = keys, {}, {}

    def layout(self, r: int) -> list[tuple[str, str, tuple[int, int]]]:
        """``(layer, key, shape)`` of a rank-r update in the flat order: layers in order, keys sorted."""
        if r not in self._layouts:
            self._layouts[r] = [(n, k, factor_shape(k, s, r)) for n, s in self.layers.items()
                                for k in self.keys]
        return self._layouts[r]

    def sized_layout(self, r: int) -> list[tuple[str, str, torch.Size]]:
        """``layout(r)`` with ``torch.Size`` shapes (compared with a decoded update's in one go)."""
        if r not in self._sized:
            self._sized[r] = [(n, k, torch.Size(s)) for n, k, s in self.layout(r)]
        return self._sized[r]

    def check(self, u: ClientUpdate, version: int, head_ref: dict[str, Tensor] | None
              ) -> tuple[str | None, ClientUpdate | None]:
        r = u.rank
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= self.r_max:
            return f"rank {r!r} outside 1..r_max={self.r_max}", None
        if u.base_version != version:
            return (f"stale base_version {u.base_version} (current {version}): retrain on a "
                    "fresh payload"), None
        if not isinstance(u.num_examples, int) or isinstance(u.num_examples, bool) or u.num_examples <= 0:
            return f"num_examples must be a positive integer, got {u.num_examples!r}", None
        if not isinstance(u.factors, dict) or set(u.factors) != set(self.layers):
            got = set(u.factors) if isinstance(u.factors, dict) else set()
            return (f"layers mismatch: missing {sorted(set(self.layers) - got)}, unknown "
                    f"{sorted(got - set(self.layers))}"), None
        reason, factors, flat = self._factors(u)
        if reason:
            return reason, None
        head = None
        if u.head is not None:
            reason, head = self._head(u.head, head_ref)
            if reason:
                return reason, None
        return None, ClientUpdate(str(u.client_id), r, u.num_examples, u.base_version, factors, head,
                                  dict(u.metrics), flat)

    def _factors(self, u: ClientUpdate) -> tuple[str | None, Factors, Tensor | None]:
        for name, f in u.factors.items():
            if not isinstance(f, dict) or set(f) != set(self.keys):
                got = sorted(f) if isinstance(f, dict) else type(f).__name__
                return (f"layer {name!r}: factors {got} but {self.name} updates carry exactly "
                        f"{self.keys}"), {}, None
        layout = self.layout(u.rank)
        flat = u.flat
        if flat is not None and not (
                isinstance(flat, Tensor) and flat.dtype == self.dtype and flat.dim() == 1
                and flat.numel() == sum(math.prod(s) for _, _, s in layout)
                and [(n, k, getattr(t, "shape", None)) for n, f in u.factors.items() for k, t in f.items()]
                == self.sized_layout(u.rank)):
            flat = None  # not the canonical layout: check factor by factor
        if flat is not None:  # the factors are consecutive views of ``flat`` (how flower_io decodes)
            return None, u.factors, flat
        factors = {}
        for n, k, shape in layout:
            t = u.factors[n][k]
            reason = check_tensor(t, shape, f"layer {n!r} factor {k}")
            if reason:
                return reason, {}, None
            factors.setdefault(n, {})[k] = t if t.dtype == self.dtype and not t.requires_grad \
                else t.detach().to(self.dtype)
        return None, factors, None

    def _head(self, head: dict, ref: dict[str, Tensor] | None) -> tuple[str | None, dict | None]:
        if not self.shares_head:
            return f"{self.name} keeps the head on the client: do not upload it", None
        if not isinstance(head, dict):
            return f"head must be a mapping of tensors, got {type(head).__name__}", None
        if ref is not None and set(head) != set(ref):
            return f"head keys {sorted(head)} != global head keys {sorted(ref)}", None
        out = {}
        for k, t in head.items():
            shape = tuple(ref[k].shape) if ref is not None else tuple(getattr(t, "shape", ()))
            reason = check_tensor(t, shape, f"head {k!r}")
            if reason:
                return reason, None
            if not torch.isfinite(t).all():
                return f"head {k!r}: contains non-finite values", None
            out[k] = t.detach().to(self.dtype)
        return None, out


def check_tensor(t, shape: tuple[int, ...], what: str) -> str | None:
    if not isinstance(t, Tensor):
        return f"{what}: expected a tensor, got {type(t).__name__}"
    if not t.is_floating_point():
        return f"{what}: dtype {t.dtype} is not floating point"
    if tuple(t.shape) != tuple(shape):
        return f"{what}: shape {tuple(t.shape)} != expected {tuple(shape)} for the declared rank"
    return None


def nonfinite_reason(u: ClientUpdate) -> str | None:
    """Why a structurally valid update's factors are not all finite (``None`` when they are)."""
    if u.flat is not None:
        if bool(torch.isfinite(u.flat).all()):
            return None
    else:
        flat = [t for f in u.factors.values() for t in f.values()]
        # the norm of a tensor is finite iff its entries are (or it overflows: then look closer)
        if bool(torch.stack(torch._foreach_norm(flat)).isfinite().all()):
            return None
    for name, f in u.factors.items():
        for key, t in f.items():
            if not torch.isfinite(t).all():
                return f"layer {name!r} factor {key}: contains non-finite values"
    return None
