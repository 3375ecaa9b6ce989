"""The records a strategy exchanges: layer shapes, payloads down, updates up, round reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedlora.strategies.deltas import Delta

Tensor = torch.Tensor
#: ``{layer: {factor key: tensor}}`` (keys ``A``, ``B``, ``R``)
Factors = dict[str, dict[str, Tensor]]


@dataclass(frozen=True)
class LayerSpec:
    d_out: int
    d_in: int


@dataclass
class BaseDelta:
    """Deltas for the clients' frozen weights (nn.Linear orientation d×k), one version step.

    ``reset=True``: the client's base delta becomes this (the full delta since ``W0``); else it adds.
    """

    version: int
    layers: dict[str, Delta]
    reset: bool = False


#: the precisions a server draws a seeded A in (``ClientPayload.a_seed_dtype``)
SEED_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class ClientPayload:
    """What one client loads before a round.

    ``trains``: the factor keys the client trains this round (the others stay frozen);
    ``uploads``: the keys its update carries; ``upload_head``: whether it uploads its head;
    ``personal_eval``: whether it evaluates its own model on its validation shard (no global model).
    ``prune_to`` (0: off) and ``tail_penalty``: local rank self-pruning (``fedlora.client.
    RankSelfPruning``): during training the components beyond ``prune_to`` carry the penalty
    ``tail_penalty·Σ_l ‖B_l[:, prune_to:]‖_F·‖A_l[prune_to:]‖_F``; after it the client drops them
    (its update then has rank ``prune_to``) when that norm product shrank during the round.
    """

    client_id: str
    rank: int
    factors: Factors
    base_deltas: list[BaseDelta]
    base_version: int
    reset: bool = False  # fresh adapter (B = 0) before loading ``factors``
    seed: int | None = None
    head: dict[str, Tensor] | None = None
    frozen: Factors | None = None
    meta: dict = field(default_factory=dict)
    bytes_down: int = 0
    trains: tuple[str, ...] = ("A", "B")
    uploads: tuple[str, ...] = ("A", "B")
    upload_head: bool = True
    personal_eval: bool = False
    prune_to: int = 0
    tail_penalty: float = 0.0
    #: layers whose ``A`` the client draws itself, ``fedlora.lora.kaiming_a(rank, d_in, seed,
    #: a_seed_dtype)`` (the leading rows of the server's ``r_max`` draw, in the server's precision,
    #: then cast like a sent factor): a seeded A (FFA-LoRA's frozen one, FLoRA's fresh one) costs
    #: one integer on the wire instead of ``r·k`` numbers. Such a layer's ``factors`` hold no ``"A"``.
    a_seeds: dict[str, int] = field(default_factory=dict)
    a_seed_dtype: str = "float32"  # one of SEED_DTYPES; Strategy.payload sets the rule's own


@dataclass
class ClientUpdate:
    """A client's upload. ``flat`` (optional, set by ``flower_io``'s decoder only): all factors in
    one 1-D buffer, of which the ``factors`` are consecutive views in their order; when that order
    is the strategy's layout (layers in order, keys sorted), a rank group is summed in one ``add_``."""

    client_id: str
    rank: int
    num_examples: int
    base_version: int
    factors: Factors
    head: dict[str, Tensor] | None = None
    metrics: dict = field(default_factory=dict)
    flat: Tensor | None = None


@dataclass
class RoundReport:
    round: int
    accepted: list[str]
    rejected: dict[str, str]
    weights: dict[str, float]
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    agg_seconds: float  # validation + aggregation + the exactness diagnostic
    aggregation_error: float | None
    version: int
    diagnostic_seconds: float = 0.0
