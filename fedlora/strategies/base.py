"""The strategy contract: what a rule declares, and the two calls it answers.

A strategy holds the global state of one federated run:

- ``payload(client_id, rank, base_version) -> ClientPayload``: what a client of that rank, holding
  the frozen base of ``base_version``, folds into its frozen weights (``base_deltas``, in order) and
  loads as its adapter (the leading ``r_i`` slice of the global factors held at ``r_max``).
- ``aggregate(updates) -> RoundReport``: validates every update (``validation.UpdateValidator``); a
  bad one is rejected with a reason and changes nothing; the others are aggregated with weights
  ``p_i`` (``n_i/Σn_j`` or uniform, over the accepted updates) by the rule's ``_aggregate``.

A rule is one subclass in one file, decorated with ``@register_strategy``. It declares what the
rest of the system needs (class attributes below) and implements the hooks ``_payload``,
``_aggregate``, ``global_delta``, ``client_change``/``global_change`` (the exactness diagnostic,
``exactness.py``) and ``_state``/``_load_state`` (checkpoints).

Versions: the base version grows by one at every aggregation that accepted an update. A client's
held base is identified by ``(base_version, rank)``; version 0 means the pretrained ``W0`` exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlora.lora import kaiming_a
from fedlora.strategies import exactness
from fedlora.strategies.accounting import payload_bytes, update_bytes
from fedlora.strategies.types import ClientPayload, ClientUpdate, LayerSpec, RoundReport
from fedlora.strategies.validation import UpdateValidator, nonfinite_reason

Tensor = torch.Tensor


@dataclass
class GroupSums:
    """``Σ_{i: r_i = r} p_i·X_i`` per rank group ``r`` for every uploaded factor, in one pass.

    ``by_key[r][key]`` lists the per-layer sums in layer order (views into ``bufs[r]``, one flat
    buffer per group); ``weight[r] = Σ_{i: r_i = r} p_i``.
    """

    weight: dict[int, float]
    by_key: dict[int, dict[str, list[Tensor]]]
    bufs: dict[int, Tensor]


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


@dataclass(frozen=True)
class NormBound:
    """An optional defence against outsized updates (off by default).

    An update's size is its parameter-space change ``‖X_i − X_sent‖_F`` over every factor it
    uploads (``X_sent``: what its payload gave it; zero for a factor the payload did not carry,
    e.g. FLoRA's fresh B). The bound is ``min(multiple · median size of the round, absolute)``
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


class Strategy:
    """Common state and machinery; a subclass implements one aggregation rule."""

    # ---- what a rule declares (read through the registry; nobody tests a strategy's name) -------
    name: ClassVar[str] = "base"
    #: adapter kind: "lora" (A, B) or "sb" (LoRA-SB: frozen B, A and a trained r×r R)
    adapter: ClassVar[str] = "lora"
    #: the factors a client trains (the others are frozen) and those its update carries
    trains: ClassVar[frozenset[str]] = frozenset({"A", "B"})
    uploads: ClassVar[frozenset[str]] = frozenset({"A", "B"})
    #: whether the task head is averaged (else it stays on each client)
    shares_head: ClassVar[bool] = True
    #: whether one global model exists; without it clients evaluate their own (personalised) models
    has_global_model: ClassVar[bool] = True
    #: what ``initialize`` needs before round 1: None, or "server-gradients" (accumulated weight
    #: gradients of each target layer on a server-held split, never a client's data)
    init_from: ClassVar[str | None] = None
    #: whether the rule satisfies the Sync and Exact contracts (STRATEGIES.md)
    exact: ClassVar[bool] = False
    #: whether the rule starts from per-rank-group weighted sums of the uploads (FLoRA: stacks)
    sums_uploads: ClassVar[bool] = True

    def __init__(self, layers: dict[str, LayerSpec], r_max: int, scale: float,
                 weighting: str = "samples", seed: int = 0, dtype: torch.dtype = torch.float32,
                 check_exactness: bool = True, history: int = 8, max_weight_share: float = 1.0,
                 norm_bound: NormBound | None = None) -> None:
        if not layers:
            raise ValueError("layers is empty: give {layer_name: LayerSpec(d_out, d_in)}")
        if not isinstance(r_max, int) or isinstance(r_max, bool) or r_max < 1:
            raise ValueError(f"r_max must be an integer >= 1, got {r_max!r}")
        for n, spec in layers.items():
            if not isinstance(spec, LayerSpec):
                raise ValueError(f"layers[{n!r}] must be a LayerSpec, got {type(spec).__name__}")
            if self.adapter == "sb" and r_max > min(spec.d_out, spec.d_in):
                raise ValueError(f"r_max={r_max} exceeds min(d_out, d_in) of layer {n!r}")
        if weighting not in ("samples", "uniform"):
            raise ValueError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
        if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        if not (isinstance(max_weight_share, int | float) and 0 < max_weight_share <= 1):
            raise ValueError(f"max_weight_share must be in (0, 1] (1: no cap), got {max_weight_share!r}")
        self.layers = dict(layers)
        self.r_max, self.scale, self.weighting = r_max, float(scale), weighting
        self.seed, self.dtype = seed, dtype
        self.check_exactness, self.history = check_exactness, history
        self.max_weight_share = float(max_weight_share)
        self.norm_bound = norm_bound or NormBound()
        self._given: dict[str, dict[str, dict[str, Tensor]]] = {}  # the factors each client was sent
        self.version = 0
        self.round = 0
        self._head: dict[str, Tensor] | None = None
        self._sent: dict[str, int] = {}  # bytes down per client since the last aggregation
        self.validator = UpdateValidator(self.name, self.layers, r_max, self.uploads, dtype, weighting,
                                         self.shares_head)

    @classmethod
    def personal_eval(cls) -> bool:
        return not cls.has_global_model

    # ---- the contract ------------------------------------------------------------------------
    def payload(self, client_id: str, rank: int, base_version: int) -> ClientPayload:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= self.r_max:
            raise ValueError(f"rank must be an integer in 1..r_max={self.r_max}, got {rank!r}")
        if not isinstance(base_version, int) or base_version < 0:
            raise ValueError(f"base_version must be an integer >= 0, got {base_version!r}")
        p = self._payload(str(client_id), rank, base_version)
        if self.shares_head and self._head is not None:
            p.head = {k: v.clone() for k, v in self._head.items()}
        p.trains, p.uploads = tuple(sorted(self.round_trains())), tuple(sorted(self.uploads))
        p.upload_head, p.personal_eval = self.shares_head, self.personal_eval()
        p.bytes_down = payload_bytes(p)
        if self.norm_bound.mode != "off":
            self._given[p.client_id] = {n: {k: f[k] for k in self.uploads if k in f}
                                        for n, f in p.factors.items()}
        self._sent[p.client_id] = self._sent.get(p.client_id, 0) + p.bytes_down
        return p

    def aggregate(self, updates: list[ClientUpdate]) -> RoundReport:
        t0 = time.perf_counter()
        rejected: dict[str, str] = {}
        accepted = self._in_range(self._structurally_valid(updates, rejected), rejected)
        accepted = self._norm_bounded(accepted, rejected)
        p = self._weights(accepted) if accepted else []
        sums = self._group_sums(accepted, p) if accepted and self.sums_uploads else None
        kept = {u.client_id for u in accepted}
        bytes_up: dict[str, int] = {}  # what the clients sent (before any cast to the server's dtype)
        for u in updates:
            if str(u.client_id) in kept:
                bytes_up.setdefault(str(u.client_id), update_bytes(u))
        bytes_down, self._sent = self._sent, {}
        diagnose = self.check_exactness and self.has_global_model and bool(accepted)
        clients = [{n: self.client_change(u, n) for n in self.layers} for u in accepted] \
            if diagnose else []
        if accepted:
            try:
                self._aggregate(accepted, p, sums)  # raises before it changes any state
            except NonFiniteAggregate as e:
                rejected.update({u.client_id: str(e) for u in accepted})
                accepted, bytes_up = [], {}
        if not accepted:
            return RoundReport(self.round, [], rejected, {}, bytes_up, bytes_down,
                               time.perf_counter() - t0, None, self.version)
        if self.shares_head and accepted[0].head is not None:
            self._head = {k: sum(pi * u.head[k] for u, pi in zip(accepted, p)) for k in accepted[0].head}
        error, diag_s = None, 0.0
        if diagnose:
            t1 = time.perf_counter()
            error = exactness.aggregation_error({n: self.global_change(n) for n in self.layers}, clients, p)
            diag_s = time.perf_counter() - t1
        self.version += 1
        self.round += 1
        return RoundReport(self.round, [u.client_id for u in accepted], rejected,
                           {u.client_id: pi for u, pi in zip(accepted, p)}, bytes_up, bytes_down,
                           time.perf_counter() - t0, error, self.version, diag_s)

    # ---- hooks a rule implements ---------------------------------------------------------------
    def _payload(self, client_id: str, rank: int, base_version: int) -> ClientPayload:
        raise NotImplementedError

    def _aggregate(self, updates: list[ClientUpdate], p: list[float], sums: GroupSums | None) -> None:
        """Change the global state from the accepted updates (raise ``NonFiniteAggregate`` before
        changing anything when the result would not be finite)."""
        raise NotImplementedError

    def global_delta(self, layer: str) -> Tensor:
        """``W_g − W0`` of one layer (dense d×k: for evaluation, exports and checks)."""
        raise NotImplementedError

    def client_change(self, u: ClientUpdate, layer: str) -> list[exactness.Term]:
        """``W_i − W_g(old)`` of an accepted update, as terms (called before ``_aggregate``)."""
        raise NotImplementedError

    def global_change(self, layer: str) -> list[exactness.Term]:
        """``W_g(new) − W_g(old)`` as terms (called right after ``_aggregate``)."""
        raise NotImplementedError

    def round_trains(self) -> frozenset[str]:
        """The factors clients train in the coming round (a rule may alternate them)."""
        return self.trains

    def initialize(self, gradients: dict[str, Tensor], **kw) -> None:
        raise ValueError(f"{self.name} needs no initialisation (init_from is None)")

    def _state(self) -> dict:
        raise NotImplementedError

    def _load_state(self, st: dict) -> None:
        raise NotImplementedError

    def global_head(self) -> dict[str, Tensor] | None:
        return None if self._head is None else {k: v.clone() for k, v in self._head.items()}

    # ---- helpers for rules ---------------------------------------------------------------------
    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(*shape, dtype=self.dtype)

    def _init_a(self, idx: int, spec: LayerSpec) -> Tensor:
        return kaiming_a(self.r_max, spec.d_in, self.seed * 100_003 + idx, self.dtype)

    def _component_means(self, old: dict[str, Tensor], key: str, axis: int,
                         sums: GroupSums) -> dict[str, Tensor]:
        """Per-rank-component weighted means of factor ``key`` for every layer.

        Component j (a column of B: ``axis=1``; a row of A: ``axis=0``) is averaged over the
        clients that hold it (``r_i > j``) with their weights renormalised; a component nobody
        holds keeps its ``old`` value.
        """
        held = torch.zeros(self.r_max, dtype=self.dtype)
        for r, w in sums.weight.items():
            held[:r] += w
        shape = (1, -1) if axis == 1 else (-1, 1)
        denom, mask = held.clamp_min(1e-300).view(shape), (held > 0).view(shape)
        out = {}
        for i, n in enumerate(self.layers):
            acc = torch.zeros_like(old[n])
            for r, by in sums.by_key.items():
                (acc[:, :r] if axis == 1 else acc[:r]).add_(by[key][i])
            out[n] = torch.where(mask, acc / denom, old[n])
        return out

    # ---- validation and sums -------------------------------------------------------------------
    def _structurally_valid(self, updates: list[ClientUpdate], rejected: dict[str, str]
                            ) -> list[ClientUpdate]:
        accepted: list[ClientUpdate] = []
        seen: dict[str, int] = {}
        for u in updates:
            cid = str(u.client_id)
            if cid in seen:  # keyed apart, so the first copy's outcome under ``cid`` stays its own
                seen[cid] += 1
                rejected[f"{cid}#{seen[cid]}"] = (f"duplicate client_id {cid!r} in this round (copy "
                                                  f"{seen[cid]}): only the first update counts")
                continue
            seen[cid] = 1
            try:
                reason, clean = self.validator.check(u, self.version, self._head)
            except Exception as e:  # noqa: BLE001 - an update is untrusted: whatever it holds
                reason, clean = f"malformed update ({type(e).__name__}: {e})", None
            if reason:
                rejected[cid] = reason
            else:
                accepted.append(clean)
        if not self.shares_head or not accepted:
            return accepted
        if any(u.head is not None for u in accepted):
            for u in [u for u in accepted if u.head is None]:
                rejected[u.client_id] = "head missing while other clients sent one"
            accepted = [u for u in accepted if u.head is not None]
            ref = {k: tuple(v.shape) for k, v in accepted[0].head.items()}
            for u in [u for u in accepted if {k: tuple(v.shape) for k, v in u.head.items()} != ref]:
                rejected[u.client_id] = "head keys/shapes differ from the other clients'"
            accepted = [u for u in accepted if u.client_id not in rejected]
        return accepted

    def magnitude_limit(self, k: int) -> float:
        """The largest Frobenius norm an uploaded factor may have in a round of ``k`` updates.

        With every factor ``‖X‖ ≤ L = √max / (4·(k+2)·max(1, s))`` (max: the dtype's largest
        number), every weighted sum of ``k`` updates is below ``L``, and every product a rule forms
        from them (``s·B·A``, FedEx's residual, FLoRA's stack, ``s·B·R·A``) below ``max/16``: no
        aggregate or global model can overflow, whichever rule runs.
        """
        return math.sqrt(torch.finfo(self.dtype).max) / (4 * (k + 2) * max(1.0, self.scale))

    def _in_range(self, updates: list[ClientUpdate], rejected: dict[str, str]) -> list[ClientUpdate]:
        """Reject, one by one, the updates with non-finite factors or factors beyond
        ``magnitude_limit``: a destructive update is rejected alone and the others go on."""
        limit = self.magnitude_limit(len(updates))
        keep = []
        for u in updates:
            ts = [u.flat] if u.flat is not None else [t for f in u.factors.values() for t in f.values()]
            norm = float(torch.stack(torch._foreach_norm(ts)).norm()) if ts else 0.0
            if norm <= limit:  # (False for NaN)
                keep.append(u)
                continue
            reason = nonfinite_reason(u)
            if reason is None:
                name, key, big = max(((n, k, float(t.norm())) for n, f in u.factors.items()
                                      for k, t in f.items()), key=lambda x: x[2])
                reason = (f"layer {name!r} factor {key}: norm {big:.3g} beyond {limit:.3g}, the most "
                          f"this round's aggregate can take without overflowing {self.dtype}: a "
                          "diverged or hostile client")
            rejected[u.client_id] = reason
        return keep

    def _norm_bounded(self, updates: list[ClientUpdate], rejected: dict[str, str]) -> list[ClientUpdate]:
        nb, given, self._given = self.norm_bound, self._given, {}
        if nb.mode == "off" or not updates:
            return updates
        sizes = []
        for u in updates:
            g = given.get(u.client_id, {})
            sq = 0.0
            for n, f in u.factors.items():
                for k, t in f.items():
                    ref = g.get(n, {}).get(k)
                    sq += float((t - ref).pow(2).sum()) if ref is not None else float(t.pow(2).sum())
            sizes.append(math.sqrt(sq))
        bounds = [b for b in (nb.multiple * sorted(sizes)[(len(sizes) - 1) // 2], nb.absolute) if b > 0]
        bound = min(bounds)
        out = []
        for u, size in zip(updates, sizes):
            if size <= bound:
                out.append(u)
            elif nb.mode == "reject":
                rejected[u.client_id] = (
                    f"update norm {size:.4g} above the norm bound {bound:.4g} (strategy.norm_bound_"
                    f"multiple={nb.multiple}, strategy.norm_bound_absolute={nb.absolute})")
            else:
                c, g = bound / size, given.get(u.client_id, {})
                factors = {n: {k: (g[n][k] + c * (t - g[n][k])) if k in g.get(n, {}) else c * t
                               for k, t in f.items()} for n, f in u.factors.items()}
                out.append(ClientUpdate(u.client_id, u.rank, u.num_examples, u.base_version, factors,
                                        u.head, {**u.metrics, "clipped_by": c}))
        return out

    def _weights(self, updates: list[ClientUpdate]) -> list[float]:
        """``p_i`` (samples or uniform); with ``max_weight_share < 1`` no client's share exceeds
        it: shares above the cap are cut to it and the rest renormalised, until none is above."""
        if self.weighting == "samples":
            total = float(sum(u.num_examples for u in updates))
            p = [u.num_examples / total for u in updates]
        else:
            p = [1.0 / len(updates)] * len(updates)
        cap = self.max_weight_share
        if cap >= 1.0 or cap * len(p) < 1.0:  # a cap below 1/K cannot hold: uniform is the closest
            return p if cap >= 1.0 else [1.0 / len(p)] * len(p)
        capped: set[int] = set()
        while True:
            free = 1.0 - cap * len(capped)
            rest = sum(pi for i, pi in enumerate(p) if i not in capped)
            q = [cap if i in capped else pi * free / rest for i, pi in enumerate(p)]
            over = {i for i, qi in enumerate(q) if qi > cap * (1 + 1e-12) and i not in capped}
            if not over:
                return q
            capped |= over

    def _group_sums(self, updates: list[ClientUpdate], p: list[float]) -> GroupSums:
        """Each rank group's weighted sum in one flat buffer (a flat update is one ``add_``, any
        other one multi-tensor add over its layers)."""
        bufs: dict[int, Tensor] = {}
        views: dict[int, list[Tensor]] = {}
        weight: dict[int, float] = {}
        for u, pi in zip(updates, p):
            r = u.rank
            if r not in bufs:
                layout = self.validator.layout(r)
                sizes = [math.prod(s) for _, _, s in layout]
                bufs[r] = torch.zeros(sum(sizes), dtype=self.dtype)
                views[r] = [v.view(s) for v, (_, _, s) in zip(torch.split(bufs[r], sizes), layout)]
                weight[r] = 0.0
            if u.flat is not None:
                bufs[r].add_(u.flat, alpha=pi)
            else:
                torch._foreach_add_(views[r], [u.factors[n][k] for n, k, _ in self.validator.layout(r)],
                                    alpha=pi)
            weight[r] += pi
        keys = self.validator.keys
        by_key = {r: {k: vs[j::len(keys)] for j, k in enumerate(keys)} for r, vs in views.items()}
        return GroupSums(weight, by_key, bufs)

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "round": self.round,
                "r_max": self.r_max, "scale": self.scale, "weighting": self.weighting,
                "seed": self.seed, "head": self._head, "state": self._state()}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("name") != self.name:
            raise ValueError(f"state is for strategy {sd.get('name')!r}, not {self.name!r}")
        if sd["r_max"] != self.r_max or float(sd["scale"]) != self.scale:
            raise ValueError("state r_max/scale differ from this strategy's: build it with the same "
                             "r_max and scale")
        self.version, self.round = int(sd["version"]), int(sd["round"])
        self._head = None if sd["head"] is None else {k: v.to(self.dtype) for k, v in sd["head"].items()}
        self._load_state(sd["state"])
        self._sent = {}
