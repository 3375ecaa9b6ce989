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
from typing import ClassVar

import torch

from fedlora.lora import kaiming_a
from fedlora.strategies import exactness
from fedlora.strategies.accounting import payload_bytes, update_bytes
from fedlora.strategies.defences import (
    NonFiniteAggregate,
    NormBound,
    capped_weights,
    in_range,
    magnitude_limit,
)
from fedlora.strategies.sums import GroupSums, group_sums
from fedlora.strategies.types import ClientPayload, ClientUpdate, LayerSpec, RoundReport
from fedlora.strategies.validation import UpdateValidator

Tensor = torch.Tensor


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
    #: whether the rule satisfies the Sync and Exact contracts (docs/strategies.md)
    exact: ClassVar[bool] = False
    #: whether the rule starts from per-rank-group weighted sums of the uploads (FLoRA: stacks)
    sums_uploads: ClassVar[bool] = True
    #: the ``[strategy]`` config keys the rule takes as keyword arguments of its constructor
    #: (``RunConfig.strategy_kwargs`` passes exactly these; e.g. HetLoRA's ``hetlora_lambda``)
    config_keys: ClassVar[tuple[str, ...]] = ()

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
        self._given_head: dict[str, dict[str, Tensor]] = {}  # and the head
        self._ranks_sent: dict[str, int] = {}  # the rank of each client's latest payload
        self.version = 0
        self.round = 0
        self._head: dict[str, Tensor] | None = None
        self._sent: dict[str, int] = {}  # bytes down per client since the last aggregation
        self._sum_bufs: dict[int, Tensor] = {}  # the rank groups' sum buffers, reused every round
        self.validator = UpdateValidator(self.name, self.layers, r_max, self.uploads, dtype, weighting,
                                         self.shares_head)

    def init_head(self, head: dict[str, Tensor]) -> None:
        """The head every client starts from (the pretrained one): the reference uploads are
        checked against from round 1, so no client's head can set the keys and shapes."""
        if self.shares_head and self._head is None:
            self._head = {k: v.detach().to(self.dtype).clone() for k, v in head.items()}

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
        if p.a_seeds:  # the client draws a seeded A in the precision this rule drew it in
            p.a_seed_dtype = str(self.dtype).removeprefix("torch.")
        if self.shares_head and self._head is not None:
            p.head = {k: v.clone() for k, v in self._head.items()}
        uploads = self.round_uploads()
        p.trains, p.uploads = tuple(sorted(self.round_trains())), tuple(sorted(uploads))
        p.upload_head, p.personal_eval = self.shares_head, self.personal_eval()
        p.bytes_down = payload_bytes(p)
        self._ranks_sent[p.client_id] = p.rank  # (a rule may send less than asked: HetLoRA's pruning)
        if self.norm_bound.mode != "off":
            given = {n: {k: f[k] for k in uploads if k in f} for n, f in p.factors.items()}
            if "A" in uploads:  # a seeded A was given too: the client's change is measured from it
                for n, seed in p.a_seeds.items():
                    given[n]["A"] = kaiming_a(p.rank, self.layers[n].d_in, seed, self.dtype)
            self._given[p.client_id] = given
            if p.head is not None:
                self._given_head[p.client_id] = p.head
        self._sent[p.client_id] = self._sent.get(p.client_id, 0) + p.bytes_down
        return p

    def aggregate(self, updates: list[ClientUpdate]) -> RoundReport:
        t0 = time.perf_counter()
        rejected: dict[str, str] = {}
        # the factors this round's updates carry: what this round's payloads asked for (an update
        # for another round is stale, rejected on its base version)
        self.validator.use_keys(self.round_uploads())
        accepted = self._structurally_valid(updates, rejected)
        accepted = in_range(accepted, magnitude_limit(self.dtype, len(accepted), self.scale), self.dtype,
                            rejected)
        given, self._given = self._given, {}
        given_head, self._given_head = self._given_head, {}
        accepted = self.norm_bound.apply(accepted, given, rejected, given_head)
        p = self._weights(accepted) if accepted else []
        sums = group_sums(accepted, p, self.validator, self.dtype, self._sum_bufs) \
            if accepted and self.sums_uploads else None
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
            error = self._aggregation_error(clients, p)
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

    def round_uploads(self) -> frozenset[str]:
        """The factors the coming round's updates carry (a subset of ``uploads``)."""
        return self.uploads

    def upload_ranks(self, sent: int) -> frozenset[int]:
        """The ranks an update may have after a payload of rank ``sent`` (a rule whose clients
        may prune their rank during the round adds the pruned one)."""
        return frozenset({sent})

    def _aggregation_error(self, clients: list[dict[str, list[exactness.Term]]], p: list[float]) -> float:
        """The round's aggregation error (docs/strategies.md), from the clients' changes (called right
        after ``_aggregate``); a rule whose inexactness lies elsewhere reports its own measure."""
        return exactness.aggregation_error({n: self.global_change(n) for n in self.layers}, clients, p)

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

    def _a_seed(self, idx: int) -> int:
        """Seed of layer ``idx``'s initial A (``_init_a``; a client draws the same leading rows)."""
        return self.seed * 100_003 + idx

    def _init_a(self, idx: int, spec: LayerSpec) -> Tensor:
        return kaiming_a(self.r_max, spec.d_in, self._a_seed(idx), self.dtype)

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
            sent = self._ranks_sent.get(cid)
            if not reason and sent is not None and u.rank not in self.upload_ranks(sent):
                reason = f"rank {u.rank} but its payload was for rank {sent}: retrain on a fresh payload"
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

    def _weights(self, updates: list[ClientUpdate]) -> list[float]:
        """``p_i``: ``n_i/Σn_j`` or uniform, capped at ``max_weight_share`` (``defences``)."""
        if self.weighting == "samples":
            total = float(sum(u.num_examples for u in updates))
            p = [u.num_examples / total for u in updates]
        else:
            p = [1.0 / len(updates)] * len(updates)
        return capped_weights(p, self.max_weight_share)

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
