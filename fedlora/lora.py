"""LoRA layers: one small module, the math here.

``LoRALinear`` wraps a frozen ``nn.Linear`` (weight ``W0 ∈ R^{d×k}``, d = out, k = in)::

    lora mode:  y = (W0 + D) x + b + s · B (A (dropout(x)))
    sb mode:    y = (W0 + D) x + b + s · B (R (A (dropout(x))))      (LoRA-SB: B, A frozen)

- ``A = lora_a.weight ∈ R^{r×k}``, ``B = lora_b.weight ∈ R^{d×r}``, ``R = lora_r.weight ∈ R^{r×r}``;
  all three are plain bias-free ``nn.Linear`` so Opacus computes their per-sample gradients.
- ``s`` is the LoRA scale: ``α/r`` or ``α/√r`` (rsLoRA). In a federated run there is one scale for
  all clients, so the layer stores ``s`` itself, not α.
- ``D`` is the **base delta**: the cumulative update folded into the frozen weights by the exact
  strategies (FedEx residuals, FLoRA stacks, rank tails). Design choice: ``W0`` is never written;
  ``D`` is kept separately in float32 (or float64 if the base is float64), and the forward pass
  uses a cached ``W0 + D`` cast to the base dtype. So folding into a bf16 base loses nothing,
  ``W0`` can be shared read-only between clients, and resetting to ``W0`` is exact.
- ``A``, ``B``, ``R`` are in the same master precision (float32 on a bf16 or quantized base, as
  PEFT keeps them): what a client trains and sends does not depend on its base's dtype.
- ``merge_()`` moves ``s·B·A`` into ``D`` (the adapter then no longer contributes) and
  ``unmerge_()`` takes it back out; both in the precision of ``D``.
- A quantized base (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, QLoRA) is called as it is and
  ``D`` is applied beside it, ``y = base(x) + D x + s·B·A x``: deltas are never folded into the
  quantized weights. Exactness then holds in delta space: every client and the server share the
  same frozen ``Q(W0)``, and what the strategies aggregate and fold (``D``, ``s·B·A``) is kept
  exactly; the global model is ``Q(W0) + ΔW`` on quantized clients and ``W0 + ΔW`` where the base
  is full precision (the server, the exports).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor
#: A delta for the frozen weight: dense (d×k), or factored ``(U, V)`` meaning ``U @ V``.
#: (Fed-SB tails travel as ``{"M": core}``; ``fedlora.client.apply_payload`` turns them into
#: ``(U, V)`` with ``LoRALinear.sb_delta``.)
Delta = Tensor | tuple[Tensor, Tensor]


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """``α/r`` (LoRA) or ``α/√r`` (rsLoRA)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the base delta: float32, or float64 when the base is float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kaiming_a(rank: int, in_features: int, seed: int | None = None,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """A fresh ``A`` (rank × in_features), Kaiming-uniform(a=√5) as in PEFT, optionally seeded.

    Rows are drawn one seeded generator in order, so the leading ``r`` rows of a rank-``R``
    draw equal a rank-``r`` draw with the same seed (leading-slice convention).
    """
    # kaiming_uniform_(a=√5) on a (r, k) weight: bound = sqrt(6 / ((1 + a²) k)) = 1/sqrt(k)
    bound = 1.0 / math.sqrt(in_features)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    w = torch.rand(rank, in_features, generator=g, dtype=torch.float64) * 2 - 1
    return (w * bound).to(dtype)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank adapter (see the module docstring for the math)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0,
                 mode: str = "lora", seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        if mode not in ("lora", "sb"):
            raise ValueError(f"mode must be 'lora' or 'sb', got {mode!r}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.quantized = type(base).__name__ in QUANTIZED
        self.mode = mode
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.base_delta: Tensor | None = None  # D, in master precision; None means zero
        # Fed-SB below r_max: (B[:, r:], A[r:]) of the global frozen factors, for the tails
        self.sb_tail: tuple[Tensor, Tensor] | None = None
        self._w_eff: Tensor | None = None  # cached (W0 + D) in the base dtype
        self.reset_(rank, seed)

    # ---- shapes -----------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def rank(self) -> int:
        return self.lora_a.out_features

    def _factory(self) -> dict:
        # adapters train in master precision: float32 on a bf16 (or quantized) base, as PEFT does
        w = self.base.weight
        return {"device": w.device, "dtype": _master_dtype(w.dtype)}

    # ---- adapter lifecycle --------------------------------------------------------------------
    def reset_(self, rank: int, seed: int | None = None) -> None:
        """A fresh adapter at ``rank``: A Kaiming-uniform(a=√5) (seeded if given), B = 0.

        In sb mode B and A are frozen and R is zero; callers load the shared B, A, R afterwards.
        """
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if self.merged:
            raise RuntimeError("reset_ on a merged layer: unmerge_() first")
        fk = self._factory()
        self.sb_tail = None
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, **fk)
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, **fk)
        with torch.no_grad():
            self.lora_a.weight.copy_(kaiming_a(rank, self.in_features, seed, fk["dtype"]))
            self.lora_b.weight.zero_()
        if self.mode == "sb":
            self.lora_r = nn.Linear(rank, rank, bias=False, **fk)
            with torch.no_grad():
                self.lora_r.weight.zero_()
            self.lora_a.weight.requires_grad_(False)
            self.lora_b.weight.requires_grad_(False)
        else:
            self.lora_r = None

    def set_factors_(self, A: Tensor | None = None, B: Tensor | None = None,
                     R: Tensor | None = None) -> None:
        """Load factors; a rank different from the current one resizes the adapter."""
        ranks = {t.shape[0] for t in (A,) if t is not None} | {
            t.shape[1] for t in (B,) if t is not None} | {
            t.shape[0] for t in (R,) if t is not None}
        if len(ranks) > 1:
            raise ValueError(f"factor ranks disagree: {sorted(ranks)}")
        if ranks and (r := ranks.pop()) != self.rank:
            self.reset_(r)
        with torch.no_grad():
            for t, lin, name in ((A, self.lora_a, "A"), (B, self.lora_b, "B"), (R, self.lora_r, "R")):
                if t is None:
                    continue
                if lin is None:
                    raise ValueError(f"factor {name} given but the layer is in {self.mode} mode")
                if tuple(t.shape) != tuple(lin.weight.shape):
                    raise ValueError(
                        f"factor {name}: shape {tuple(t.shape)} != expected {tuple(lin.weight.shape)}")
                lin.weight.copy_(t.to(lin.weight.dtype))

    def factors(self) -> dict[str, Tensor]:
        """The adapter factors (detached copies): ``{"A", "B"}`` plus ``"R"`` in sb mode (and
        ``"A_tail"``, ``"B_tail"`` when the layer holds Fed-SB tails)."""
        out = {"A": self.lora_a.weight.detach().clone(), "B": self.lora_b.weight.detach().clone()}
        if self.lora_r is not None:
            out["R"] = self.lora_r.weight.detach().clone()
        if self.sb_tail is not None:
            out["B_tail"], out["A_tail"] = (t.detach().clone() for t in self.sb_tail)
        return out

    def sb_delta(self, M: Tensor, B: Tensor | None = None, A: Tensor | None = None
                 ) -> tuple[Tensor, Tensor]:
        """``s·B_full·M·A_full`` as factors ``(U, V)``: a Fed-SB tail sent as its r_max×r_max core.

        ``B_full = [B | B_tail]``, ``A_full = [A; A_tail]``: the layer's frozen leading slice (or
        the given ``B``, ``A``) and the tail components it holds in ``sb_tail``.
        """
        md = _master_dtype(self.base.weight.dtype)
        B = self.lora_b.weight if B is None else B
        A = self.lora_a.weight if A is None else A
        if M.shape[0] != B.shape[1]:
            if self.sb_tail is None:
                raise ValueError(f"a Fed-SB tail of size {tuple(M.shape)} needs the frozen tail factors "
                                 f"(the layer holds rank {B.shape[1]} and no tail): re-sync from base 0")
            B = torch.cat([B, self.sb_tail[0].to(B.device, B.dtype)], 1)
            A = torch.cat([A, self.sb_tail[1].to(A.device, A.dtype)], 0)
        if M.shape != (B.shape[1], A.shape[0]):
            raise ValueError(f"Fed-SB tail core {tuple(M.shape)} does not fit factors of rank {B.shape[1]}")
        return self.scale * B.to(md) @ M.to(B.device, md), A.to(md)

    # ---- math ---------------------------------------------------------------------------------
    def adapter_product(self) -> Tensor:
        """``B·A`` (lora) or ``B·R·A`` (sb), unscaled, in master precision."""
        md = _master_dtype(self.base.weight.dtype)
        B, A = self.lora_b.weight.to(md), self.lora_a.weight.to(md)
        if self.lora_r is not None:
            return B @ self.lora_r.weight.to(md) @ A
        return B @ A

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """The adapter's effective update ``s·B·A`` (or ``s·B·R·A``), d×k, master precision."""
        return self.scale * self.adapter_product()

    @torch.no_grad()
    def effective_weight(self) -> Tensor:
        """``W0 + D + s·B·A`` in master precision (what the layer computes, minus the bias)."""
        md = _master_dtype(self.base.weight.dtype)
        w = dequantized_weight(self.base).to(md) if self.quantized else self.base.weight.detach().to(md)
        if self.base_delta is not None:
            w = w + self.base_delta
        return w if self.merged else w + self.delta_weight()

    def _weight(self) -> Tensor:
        if self.quantized:
            raise TypeError("a quantized base has no dense weight to combine with D (forward applies D "
                            "beside it); this operation needs a full-precision base")
        if self.base_delta is None:
            return self.base.weight
        w0 = self.base.weight
        if w0.requires_grad:  # a gradient through the frozen weight is wanted (Fed-SB init): no cache
            return (w0.to(self.base_delta.dtype) + self.base_delta).to(w0.dtype)
        if self._w_eff is None:
            w0 = self.base.weight.detach()
            self._w_eff = (w0.to(self.base_delta.dtype) + self.base_delta).to(w0.dtype)
        return self._w_eff

    def forward(self, x: Tensor) -> Tensor:
        if self.quantized:
            y = self.base(x)
            if self.base_delta is not None:
                y = y + F.linear(x.to(self.base_delta.dtype), self.base_delta).to(y.dtype)
        else:
            y = F.linear(x, self._weight(), self.base.bias)
        if self.merged:
            return y
        ad = self.lora_a.weight.dtype
        if x.dtype != ad and not torch.is_autocast_enabled(x.device.type):
            x = x.to(ad)  # a bf16 base outside autocast: the adapter computes in its own precision
        h = self.lora_a(self.dropout(x))
        if self.lora_r is not None:
            h = self.lora_r(h)
        return y + (self.scale * self.lora_b(h)).to(y.dtype)

    # ---- base delta ---------------------------------------------------------------------------
    def _as_dense(self, delta: Delta) -> Tensor:
        md = _master_dtype(self.base.weight.dtype)
        dev = self.base.weight.device
        if isinstance(delta, tuple | list):
            U, V = delta
            if U.shape[0] != self.out_features or V.shape[1] != self.in_features or \
                    U.shape[1] != V.shape[0]:
                raise ValueError(
                    f"factored delta U{tuple(U.shape)} @ V{tuple(V.shape)} does not make a "
                    f"{self.out_features}x{self.in_features} matrix (nn.Linear orientation d×k)")
            return U.to(dev, md) @ V.to(dev, md)
        if tuple(delta.shape) != (self.out_features, self.in_features):
            raise ValueError(f"dense delta has shape {tuple(delta.shape)}, expected "
                             f"({self.out_features}, {self.in_features}) (nn.Linear orientation d×k)")
        return delta.to(dev, md)

    def fold_into_base_(self, delta: Delta) -> None:
        """``D ← D + delta`` (dense d×k or factored ``(U, V)``), in master precision."""
        d = self._as_dense(delta)
        self.base_delta = d.clone() if self.base_delta is None else self.base_delta + d
        self._w_eff = None

    def set_base_delta_(self, delta: Delta | None) -> None:
        """``D ← delta`` (``None``: back to the pretrained ``W0``)."""
        self.base_delta = None if delta is None else self._as_dense(delta).clone()
        self._w_eff = None

    def merge_(self) -> None:
        """Fold ``s·B·A`` into ``D``; the adapter stops contributing until ``unmerge_()``."""
        if self.merged:
            return
        self.fold_into_base_(self.delta_weight())
        self.merged = True

    def unmerge_(self) -> None:
        if not self.merged:
            return
        self.fold_into_base_(-self.delta_weight())
        self.merged = False

    def _apply(self, fn, recurse=True):  # keep D on the base's device, in master precision
        super()._apply(fn, recurse)
        if self.base_delta is not None:
            w = self.base.weight
            self.base_delta = self.base_delta.to(w.device, _master_dtype(w.dtype))
        self._w_eff = None
        return self

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"scale={self.scale:g}, mode={self.mode}")


#: bitsandbytes' quantized linear layers (subclasses of nn.Linear) that LoRALinear wraps as they are
QUANTIZED = ("Linear4bit", "Linear8bitLt")


def dequantized_weight(layer: nn.Linear) -> Tensor:
    """The dense weight of a bitsandbytes 4-bit or 8-bit layer (for diagnostics, not the forward)."""
    import bitsandbytes.functional as bnbf

    w = layer.weight
    if type(layer).__name__ == "Linear4bit":
        return bnbf.dequantize_4bit(w.data, w.quant_state)
    # the int8 weight and its row scales: on the parameter until the first forward pass, then in
    # the layer's state (bitsandbytes moves them there)
    cb = w.CB if getattr(w, "CB", None) is not None else layer.state.CB
    scb = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
    return cb.float() * scb.float()[:, None] / 127.0


# ---- injection ----------------------------------------------------------------------------------

@dataclass
class LoRAConfig:
    """Where and how to put adapters.

    ``targets``: module-name patterns; a pattern matches a module whose full name equals it, ends
    with ``.<pattern>``, or matches it as a glob (``layers.*.attn.q``). ``rank`` is the default
    rank; ``ranks`` maps a pattern to a per-module rank. ``scale`` overrides ``α/r`` (federated runs
    fix one scale for every client). ``trainable`` names extra modules left trainable (a head).
    """

    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    mode: str = "lora"
    scale: float | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    trainable: list[str] = field(default_factory=list)
    seed: int | None = 0

    def scale_for(self, rank: int) -> float:
        return self.scale if self.scale is not None else lora_scale(self.alpha, rank, self.rslora)


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def _check_rank(rank: int, where: str) -> int:
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: rank must be an integer >= 1, got {rank!r}")
    return rank


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Replace the target ``nn.Linear`` modules by ``LoRALinear``; freeze everything else.

    Everything except the adapters' trainable factors and the modules named in
    ``config.trainable`` gets ``requires_grad=False``. Returns the adapted module names in model
    order. Raises ``ValueError`` when a pattern matches nothing, matches a non-Linear module, or a
    rank is < 1.
    """
    _check_rank(config.rank, "LoRAConfig.rank")
    for pat, r in config.ranks.items():
        _check_rank(r, f"LoRAConfig.ranks[{pat!r}]")
    if not config.targets:
        raise ValueError("LoRAConfig.targets is empty: name at least one nn.Linear (e.g. 'query')")
    names = [n for n, _ in model.named_modules() if n]
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for pat in config.targets:
        hits = [n for n in names if _matches(n, pat)]
        if not hits:
            raise ValueError(f"LoRA target {pat!r} matches no module; some module names: "
                             f"{names[:12]}")
        for n in hits:
            m = modules[n]
            if isinstance(m, LoRALinear):
                continue
            if not isinstance(m, nn.Linear):
                raise ValueError(f"LoRA target {pat!r} matches {n!r}, a {type(m).__name__}; only "
                                 "nn.Linear can be adapted (narrow the pattern)")
            if n not in chosen:
                chosen.append(n)
    for p in model.parameters():
        p.requires_grad_(False)
    order = {n: i for i, n in enumerate(names)}
    chosen.sort(key=order.__getitem__)
    for i, n in enumerate(chosen):
        rank = config.rank
        for pat, r in config.ranks.items():
            if _matches(n, pat):
                rank = r
        seed = None if config.seed is None else config.seed + i
        layer = LoRALinear(modules[n], rank, config.scale_for(rank), config.dropout, config.mode,
                           seed)
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    for pat in config.trainable:
        hits = [n for n, _ in model.named_modules() if n and _matches(n, pat)]
        if not hits:
            raise ValueError(f"trainable module {pat!r} matches no module")
        for n in hits:
            for p in model.get_submodule(n).parameters():
                p.requires_grad_(True)
    return chosen


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """``{layer: {"A": r×k, "B": d×r[, "R": r×r]}}`` (detached copies)."""
    return {n: m.factors() for n, m in lora_layers(model).items()}


def load_adapter_state(model: nn.Module, state: Mapping[str, Mapping[str, Tensor]]) -> None:
    """Load factors by layer name (missing factors are left as they are; unknown layers raise)."""
    layers = lora_layers(model)
    unknown = set(state) - set(layers)
    if unknown:
        raise ValueError(f"adapter state names unknown layers: {sorted(unknown)}")
    for n, f in state.items():
        layers[n].set_factors_(f.get("A"), f.get("B"), f.get("R"))
        if "A_tail" in f and "B_tail" in f:
            layers[n].sb_tail = (f["B_tail"], f["A_tail"])


def effective_weight(model: nn.Module, name: str) -> Tensor:
    """``W0 + D + s·B·A`` of one adapted layer, master precision."""
    layers = lora_layers(model)
    if name not in layers:
        raise KeyError(f"{name!r} is not an adapted layer; adapted: {list(layers)}")
    return layers[name].effective_weight()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
