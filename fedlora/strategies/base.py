"""The strategy contract: payloads down, updates up, validation, versions, bytes.

A strategy holds the global state of one federated run and answers two calls:

- ``payload(client_id, rank, base_version) -> ClientPayload``: what a client of that rank, holding the
  frozen base of ``base_version``, must fold into its frozen weights (``base_deltas``, in order) and
  load as its adapter (the leading ``r_i`` slice of the global factors held at ``r_max``).
- ``aggregate(updates) -> RoundReport``: validates every update first; a bad one is rejected with a
  reason and changes nothing; the others are aggregated with weights ``p_i`` (``n_i/Σn_j`` or
  uniform, over the accepted updates). Finiteness of an update decoded as one flat buffer
  (``flower_io``) is read off its rank group's weighted sum (see ``_checked_values``); a round
  whose aggregate overflows the server's dtype is rejected whole.

Versions: the base version grows by one at every aggregation that accepted an update. A client's
held base is identified by ``(base_version, rank)``; version 0 means the pretrained ``W0`` exactly.
A client that changes rank must resync from version 0.

Exactness diagnostic (``check_exactness``): ``‖W_g(new) − Σp_i W_i‖_F / ‖Σp_i W_i − W_g(old)‖_F`` over
all layers, with ``W_i`` client i's effective weight after local training.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch

from fedlora.lora import kaiming_a

Tensor = torch.Tensor
#: A base delta for one layer: dense d×k, or factored ``(U, V)`` meaning ``U @ V``.
Delta = Tensor | tuple[Tensor, Tensor]


@dataclass(frozen=True)
class LayerSpec:
    d_out: int
    d_in: int


@dataclass
class BaseDelta:
    """Deltas for the clients' frozen weights (nn.Linear orientation d×k), one version step.

    ``reset=True``: the client's base delta becomes this (full delta since ``W0``); else it adds.
    """

    version: int
    layers: dict[str, Delta]
    reset: bool = False


@dataclass
class ClientPayload:
    client_id: str
    rank: int
    factors: dict[str, dict[str, Tensor]]
    base_deltas: list[BaseDelta]
    base_version: int
    reset: bool = False  # fresh adapter (B = 0) before loading ``factors``
    seed: int | None = None
    head: dict[str, Tensor] | None = None
    frozen: dict[str, dict[str, Tensor]] | None = None
    meta: dict = field(default_factory=dict)
    bytes_down: int = 0


@dataclass
class ClientUpdate:
    client_id: str
    rank: int
    num_examples: int
    base_version: int
    factors: dict[str, dict[str, Tensor]]
    head: dict[str, Tensor] | None = None
    metrics: dict = field(default_factory=dict)


@dataclass
class RoundReport:
    round: int
    accepted: list[str]
    rejected: dict[str, str]
    weights: dict[str, float]
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    agg_seconds: float
    aggregation_error: float | None
    version: int


@dataclass
class GroupSums:
    """``Σ_{i: r_i = r} p_i·X_i`` per rank group ``r`` for every uploaded factor, one pass.

    ``by_key[r][key]`` lists the per-layer sums in layer order (views into one flat buffer per
    group); ``weight[r] = Σ_{i: r_i = r} p_i``.
    """

    weight: dict[int, float]
    by_key: dict[int, dict[str, list[Tensor]]]


class NonFiniteAggregate(ValueError):
    """Finite uploads whose aggregate overflows the server's dtype: the round is rejected whole."""


def overflow_reason(what: str, dtype: torch.dtype) -> str:
    return (f"the {what} overflows {dtype}: factors this large are a diverged client; lower the "
            "learning rate or clip the updates")


def require_finite(dense: dict[str, Tensor], what: str, dtype: torch.dtype) -> None:
    """Raise ``NonFiniteAggregate`` unless every layer's tensor is finite (before any state change)."""
    # a sum is 20× cheaper than isfinite().all() and non-finite whenever an entry is (or when
    # finite entries overflow it: then look at the entries)
    bad = [n for n, t in dense.items()
           if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteAggregate(overflow_reason(f"{what} of layer {bad[0]!r}", dtype))


def tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def delta_bytes(d: Delta) -> int:
    return sum(tensor_bytes(t) for t in d) if isinstance(d, tuple) else tensor_bytes(d)


def nested_bytes(obj) -> int:
    """Bytes of every tensor inside dicts/lists/tuples/BaseDeltas."""
    if isinstance(obj, Tensor):
        return tensor_bytes(obj)
    if isinstance(obj, BaseDelta):
        return nested_bytes(obj.layers)
    if isinstance(obj, dict):
        return sum(nested_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(nested_bytes(v) for v in obj)
    return 0


def _factor_bytes(u: ClientUpdate) -> int:
    """Bytes of an update's factors and head (flat: this runs for every update every round)."""
    ts = [t for f in u.factors.values() for t in f.values()] + list((u.head or {}).values())
    return sum(t.numel() * t.element_size() for t in ts)


def dense(d: Delta) -> Tensor:
    return d[0] @ d[1] if isinstance(d, tuple) else d


def numel(d: Delta) -> int:
    return sum(t.numel() for t in d) if isinstance(d, tuple) else d.numel()


def factored_or_dense(U: Tensor, V: Tensor) -> tuple[Delta, Tensor]:
    """``(transport form, dense U@V)``: factors when ``ρ(d+k) < d·k`` numbers, else dense."""
    D = U @ V
    rho = U.shape[1]
    if rho * (U.shape[0] + V.shape[1]) < D.numel():
        return (U.contiguous(), V.contiguous()), D
    return D, D


class Strategy:
    """Common state and machinery; subclasses implement the aggregation rule."""

    name = "base"
    #: factor keys a client uploads
    upload_keys: frozenset[str] = frozenset({"A", "B"})
    #: whether a single global model exists (FedSA: no)
    has_global_model = True
    shares_head = True
    #: whether the rule starts from per-rank-group weighted sums of the uploads (FLoRA: stacks)
    sums_uploads = True

    def __init__(self, layers: dict[str, LayerSpec], r_max: int, scale: float,
                 weighting: str = "samples", seed: int = 0, dtype: torch.dtype = torch.float32,
                 check_exactness: bool = True, history: int = 8) -> None:
        if not layers:
            raise ValueError("layers is empty: give {layer_name: LayerSpec(d_out, d_in)}")
        if not isinstance(r_max, int) or r_max < 1:
            raise ValueError(f"r_max must be an integer >= 1, got {r_max!r}")
        for n, spec in layers.items():
            if not isinstance(spec, LayerSpec):
                raise ValueError(f"layers[{n!r}] must be a LayerSpec, got {type(spec).__name__}")
            if r_max > min(spec.d_out, spec.d_in) and self.name == "fedsb":
                raise ValueError(f"r_max={r_max} exceeds min(d_out, d_in) of layer {n!r}")
        if weighting not in ("samples", "uniform"):
            raise ValueError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
        if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.layers = dict(layers)
        self.r_max = r_max
        self.scale = float(scale)
        self.weighting = weighting
        self.seed = seed
        self.dtype = dtype
        self.check_exactness = check_exactness
        self.history = history
        self.version = 0
        self.round = 0
        self._head: dict[str, Tensor] | None = None
        self._sent: dict[str, int] = {}  # bytes down per client since the last aggregation
        self._shape_cache: dict[int, list[tuple[int, int]]] = {}

    # ---- helpers for subclasses ---------------------------------------------------------------
    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(*shape, dtype=self.dtype)

    def _init_a(self, idx: int, spec: LayerSpec) -> Tensor:
        return kaiming_a(self.r_max, spec.d_in, self.seed * 100_003 + idx, self.dtype)

    def _check_rank(self, rank: int) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= self.r_max:
            raise ValueError(f"rank must be an integer in 1..r_max={self.r_max}, got {rank!r}")

    def _component_means(self, old: dict[str, Tensor], key: str, axis: int,
                         sums: GroupSums) -> dict[str, Tensor]:
        """Per-rank-component weighted means of factor ``key`` for every layer.

        Component j (a column of B: ``axis=1``; a row of A: ``axis=0``) is averaged over the
        clients that hold it (``r_i > j``) with their weights renormalised; a component nobody
        holds keeps its ``old`` value. ``sums`` holds the rank groups' weighted sums.
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

    def _shapes(self, r: int) -> list[tuple[int, int]]:
        """Shapes of a rank-r update's factors in the flat layout: layers in order, keys sorted."""
        if r not in self._shape_cache:
            keys = sorted(self.upload_keys)
            want = {"A": lambda s: (r, s.d_in), "B": lambda s: (s.d_out, r), "R": lambda s: (r, r)}
            self._shape_cache[r] = [want[k](spec) for spec in self.layers.values() for k in keys]
        return self._shape_cache[r]

    def _flat(self, u: ClientUpdate) -> Tensor | None:
        """The update's factors as one 1-D tensor when they already are consecutive views of one
        buffer in the flat layout (``flower_io`` decodes a reply that way), else ``None``."""
        keys = sorted(self.upload_keys)
        ts = [u.factors[n][k] for n in self.layers for k in keys]
        if {t.dtype for t in ts} != {self.dtype} or not all(t.is_contiguous() for t in ts):
            return None
        if len({t.untyped_storage().data_ptr() for t in ts}) != 1:
            return None
        offsets = [t.storage_offset() for t in ts]
        ends = list(itertools.accumulate((t.numel() for t in ts), initial=offsets[0]))
        if offsets != ends[:-1]:
            return None
        return torch.empty(0, dtype=self.dtype).set_(ts[0].untyped_storage(), offsets[0],
                                                     (ends[-1] - offsets[0],))

    def _group_sums(self, updates: list[ClientUpdate], p: list[float],
                    flats: list[Tensor | None]) -> tuple[GroupSums, dict[int, Tensor]]:
        """One pass over the uploads: each rank group's weighted sum in one flat buffer (a flat
        update is one ``add_``; any other one multi-tensor add over its layers)."""
        keys = sorted(self.upload_keys)
        names = list(self.layers)
        bufs: dict[int, Tensor] = {}
        views: dict[int, list[Tensor]] = {}
        weight: dict[int, float] = {}
        for u, pi, flat in zip(updates, p, flats):
            r = u.rank
            if r not in bufs:
                shapes = self._shapes(r)
                bufs[r] = torch.zeros(sum(a * b for a, b in shapes), dtype=self.dtype)
                views[r] = [v.view(sh) for v, sh in
                            zip(torch.split(bufs[r], [a * b for a, b in shapes]), shapes)]
                weight[r] = 0.0
            if flat is not None:
                bufs[r].add_(flat, alpha=pi)
            else:
                torch._foreach_add_(views[r], [u.factors[n][k] for n in names for k in keys],
                                    alpha=pi)
            weight[r] += pi
        nk = len(keys)
        by_key = {r: {k: vs[j::nk] for j, k in enumerate(keys)} for r, vs in views.items()}
        return GroupSums(weight, by_key), bufs

    # ---- the contract ------------------------------------------------------------------------
    def payload(self, client_id: str, rank: int, base_version: int) -> ClientPayload:
        self._check_rank(rank)
        if not isinstance(base_version, int) or base_version < 0:
            raise ValueError(f"base_version must be an integer >= 0, got {base_version!r}")
        p = self._payload(str(client_id), rank, base_version)
        if self.shares_head and self._head is not None:
            p.head = {k: v.clone() for k, v in self._head.items()}
        p.bytes_down = nested_bytes(p.factors) + nested_bytes(p.base_deltas) + nested_bytes(p.head) \
            + nested_bytes(p.frozen)
        self._sent[p.client_id] = self._sent.get(p.client_id, 0) + p.bytes_down
        return p

    def _payload(self, client_id: str, rank: int, base_version: int) -> ClientPayload:
        raise NotImplementedError

    def validate(self, u: ClientUpdate, check_values: bool = True
                 ) -> tuple[str | None, ClientUpdate | None]:
        """``(reason, None)`` for a bad update, ``(None, cleaned)`` for a good one (cast to dtype).

        ``check_values=False`` checks everything but the factors' finiteness (``aggregate`` checks
        that on the rank groups' sums, see there).
        """
        if not isinstance(u.rank, int) or not 1 <= u.rank <= self.r_max:
            return f"rank {u.rank!r} outside 1..r_max={self.r_max}", None
        if u.base_version != self.version:
            return (f"stale base_version {u.base_version} (current {self.version}): retrain on a "
                    "fresh payload"), None
        if self.weighting == "samples" and (not isinstance(u.num_examples, int)
                                            or u.num_examples <= 0):
            return f"num_examples must be a positive integer, got {u.num_examples!r}", None
        if set(u.factors) != set(self.layers):
            missing, extra = set(self.layers) - set(u.factors), set(u.factors) - set(self.layers)
            return f"layers mismatch: missing {sorted(missing)}, unknown {sorted(extra)}", None
        clean = self._clean_fast(u)
        if clean is None:
            reason, clean = self._clean_each(u)
            if reason:
                return reason, None
        head = None
        if u.head is not None:
            if not self.shares_head:
                return f"{self.name} keeps the head on the client: do not upload it", None
            if self._head is not None and set(u.head) != set(self._head):
                return f"head keys {sorted(u.head)} != global head keys {sorted(self._head)}", None
            head = {}
            for k, t in u.head.items():
                shape = tuple(self._head[k].shape) if self._head is not None else tuple(t.shape)
                reason = self._check_tensor(t, shape, f"head {k!r}")
                if reason:
                    return reason, None
                head[k] = t.detach().to(self.dtype)
        clean_u = ClientUpdate(u.client_id, u.rank, u.num_examples, u.base_version, clean, head,
                               dict(u.metrics))
        if check_values:
            reason = self._value_reason(clean_u)
            if reason:
                return reason, None
        return None, clean_u

    def _clean_fast(self, u: ClientUpdate) -> dict[str, dict[str, Tensor]] | None:
        """The factors as they are when every one is a tensor of the strategy's dtype with the
        declared rank's shape (the common case, checked in bulk); ``None``: check one by one."""
        if any(f.keys() != self.upload_keys for f in u.factors.values()):
            return None
        keys = sorted(self.upload_keys)
        ts = [u.factors[n][k] for n in self.layers for k in keys]
        if not all(type(t) is Tensor for t in ts) or {t.dtype for t in ts} != {self.dtype}:
            return None
        if any(t.requires_grad for t in ts) or [t.shape for t in ts] != self._shapes(u.rank):
            return None
        return {n: dict(f) for n, f in u.factors.items()}

    def _clean_each(self, u: ClientUpdate) -> tuple[str | None, dict[str, dict[str, Tensor]]]:
        """Factor by factor: the first reason one is wrong, or the factors cast to the dtype."""
        r = u.rank
        clean: dict[str, dict[str, Tensor]] = {}
        for name, f in u.factors.items():
            if f.keys() != self.upload_keys:
                return (f"layer {name!r}: factors {sorted(f)} but {self.name} updates carry exactly "
                        f"{sorted(self.upload_keys)}"), {}
            spec = self.layers[name]
            want = {"A": (r, spec.d_in), "B": (spec.d_out, r), "R": (r, r)}
            clean[name] = {}
            for key, t in f.items():
                reason = self._check_tensor(t, want[key], f"layer {name!r} factor {key}",
                                            check_values=False)
                if reason:
                    return reason, {}
                clean[name][key] = t if t.dtype == self.dtype and not t.requires_grad \
                    else t.detach().to(self.dtype)
        return None, clean

    def _value_reason(self, u: ClientUpdate) -> str | None:
        """Why a structurally valid update's factors are not all finite (``None`` when they are)."""
        flat = [t for f in u.factors.values() for t in f.values()]
        if bool(torch.stack(torch._foreach_norm(flat)).isfinite().all()):
            return None  # the norm of a tensor is finite iff it is (or overflows: check each)
        for name, f in u.factors.items():
            for key, t in f.items():
                if not torch.isfinite(t).all():
                    return f"layer {name!r} factor {key}: contains non-finite values"
        return None

    @staticmethod
    def _check_tensor(t, shape: tuple[int, ...], what: str, check_values: bool = True) -> str | None:
        if not isinstance(t, Tensor):
            return f"{what}: expected a tensor, got {type(t).__name__}"
        if not t.is_floating_point():
            return f"{what}: dtype {t.dtype} is not floating point"
        if t.shape != shape:
            return f"{what}: shape {tuple(t.shape)} != expected {shape} for the declared rank"
        if check_values and not torch.isfinite(t).all():
            return f"{what}: contains non-finite values"
        return None

    def aggregate(self, updates: list[ClientUpdate]) -> RoundReport:
        t0 = time.perf_counter()
        rejected: dict[str, str] = {}
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
            reason, clean = self.validate(u, check_values=False)
            if reason:
                rejected[cid] = reason
            else:
                accepted.append(clean)
        heads = [u.head is not None for u in accepted]
        if self.shares_head and accepted and any(heads) and not all(heads):
            for u in [u for u in accepted if u.head is None]:
                rejected[str(u.client_id)] = "head missing while other clients sent one"
            accepted = [u for u in accepted if u.head is not None]
        if self.shares_head and self._head is None and accepted and accepted[0].head is not None:
            ref = {k: tuple(v.shape) for k, v in accepted[0].head.items()}
            keep = []
            for u in accepted:
                if {k: tuple(v.shape) for k, v in u.head.items()} != ref:
                    rejected[str(u.client_id)] = "head keys/shapes differ from the other clients'"
                else:
                    keep.append(u)
            accepted = keep
        accepted, p, sums = self._checked_values(accepted, rejected)
        kept = {str(u.client_id) for u in accepted}
        bytes_up: dict[str, int] = {}  # what the clients sent (before any cast to the server's dtype)
        for u in updates:
            if str(u.client_id) in kept:
                bytes_up.setdefault(str(u.client_id), _factor_bytes(u))
        bytes_down, self._sent = self._sent, {}
        if not accepted:
            return RoundReport(self.round, [], rejected, {}, bytes_up, bytes_down,
                               time.perf_counter() - t0, None, self.version)
        target = old = None
        if self.check_exactness and self.has_global_model:
            old = {n: self.global_delta(n) for n in self.layers}
            target = {n: sum(pi * self._client_delta(u, n) for u, pi in zip(accepted, p))
                      for n in self.layers}
        t1 = time.perf_counter()
        try:
            self._aggregate(accepted, p, sums)  # raises before it changes any state
        except NonFiniteAggregate as e:
            rejected.update({str(u.client_id): str(e) for u in accepted})
            return RoundReport(self.round, [], rejected, {}, {}, bytes_down,
                               time.perf_counter() - t0, None, self.version)
        if self.shares_head and accepted[0].head is not None:
            self._head = {k: sum(pi * u.head[k] for u, pi in zip(accepted, p)) for k in accepted[0].head}
        self.version += 1
        self.round += 1
        agg_seconds = time.perf_counter() - t1
        error = None
        if target is not None:
            num = sum(float((self.global_delta(n) - target[n]).pow(2).sum()) for n in self.layers)
            den = sum(float((target[n] - old[n]).pow(2).sum()) for n in self.layers)
            error = math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)
        return RoundReport(self.round, [str(u.client_id) for u in accepted], rejected,
                           {str(u.client_id): pi for u, pi in zip(accepted, p)}, bytes_up, bytes_down,
                           agg_seconds, error, self.version)

    def _weights(self, updates: list[ClientUpdate]) -> list[float]:
        if self.weighting == "samples":
            total = float(sum(u.num_examples for u in updates))
            return [u.num_examples / total for u in updates]
        return [1.0 / len(updates)] * len(updates)

    def _checked_values(self, updates: list[ClientUpdate], rejected: dict[str, str]
                        ) -> tuple[list[ClientUpdate], list[float], GroupSums | None]:
        """Drop the updates with non-finite factors; their weights and the rank groups' sums.

        An update decoded as one flat buffer is not scanned on its own: NaN and ±∞ survive a sum
        with positive weights, so a finite sum per group clears every member at no extra pass over
        the bytes. Only when a sum is not finite are its members checked one by one; if none is at
        fault the finite uploads overflowed the server's dtype, and the round is rejected whole
        rather than written into the global state as ∞.
        """
        flats = []
        keep = []
        for u in updates:
            flat = self._flat(u)
            reason = None if flat is not None else self._value_reason(u)
            if reason:
                rejected[str(u.client_id)] = reason
            else:
                keep.append(u)
                flats.append(flat)
        while keep:
            p = self._weights(keep)
            sums = None
            if self.sums_uploads:  # a non-finite group sum makes its flat members suspects
                sums, bufs = self._group_sums(keep, p, flats)
                groups = {r for r, b in bufs.items() if not bool(torch.isfinite(b.sum()))}
                suspects = [i for i, (u, f) in enumerate(zip(keep, flats))
                            if f is not None and u.rank in groups]
            else:  # FLoRA stacks: one sum per flat update
                suspects = [i for i, f in enumerate(flats)
                            if f is not None and not bool(torch.isfinite(f.sum()))]
            if not suspects:
                return keep, p, sums
            bad = {i for i in suspects if not bool(torch.isfinite(flats[i]).all())}
            if not bad and not self.sums_uploads:
                return keep, p, None  # only our check's sum overflowed; the values are finite
            if not bad:
                reason = overflow_reason("weighted sum of this round's updates", self.dtype)
                rejected.update({str(u.client_id): reason for u in keep})
                return [], [], None
            for i in bad:
                rejected[str(keep[i].client_id)] = self._value_reason(keep[i]) or "non-finite values"
            keep = [u for i, u in enumerate(keep) if i not in bad]
            flats = [f for i, f in enumerate(flats) if i not in bad]
        return [], [], None

    def _aggregate(self, updates: list[ClientUpdate], p: list[float], sums: GroupSums | None
                   ) -> None:
        raise NotImplementedError

    def _client_delta(self, u: ClientUpdate, layer: str) -> Tensor:
        """``W_i − W0`` for an accepted update (before the aggregation changes the state)."""
        raise NotImplementedError

    def global_delta(self, layer: str) -> Tensor:
        raise NotImplementedError

    def global_head(self) -> dict[str, Tensor] | None:
        return None if self._head is None else {k: v.clone() for k, v in self._head.items()}

    def initialize(self, gradients: dict[str, Tensor], **kw) -> None:
        """Only Fed-SB needs an initialisation; the others start from seeded factors."""

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

    def _state(self) -> dict:
        raise NotImplementedError

    def _load_state(self, st: dict) -> None:
        raise NotImplementedError


def pack_delta(d: Delta) -> dict[str, Tensor]:
    """A delta as a plain dict for state_dicts (checkpoints need no tuples)."""
    return {"U": d[0], "V": d[1]} if isinstance(d, tuple) else {"D": d}


def unpack_delta(d: dict[str, Tensor]) -> Delta:
    return (d["U"], d["V"]) if "U" in d else d["D"]
