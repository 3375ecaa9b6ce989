"""Sample-level differential privacy for one client, on Opacus 1.6.

One client, one round::

    state = PrivacyState.from_dict(saved)               # {} on the client's first round
    res = train_private(model, dataset, cfg=cfg, state=state, batch_size=32, steps=50,
                        planned_total_steps=rounds * 50, optim=OptimConfig(lr=1e-2))
    save(res.state.to_dict())                           # plain lists/floats: fits a ConfigRecord
    metrics = res.metrics()                             # epsilon so far, delta, declined

What the guarantee is: each client's local training is DP-SGD over its own examples (Poisson
sampling at rate ``q = batch_size / n_i``, per-sample clipping to ``max_grad_norm``, Gaussian noise
``σ·max_grad_norm``), so the adapters it uploads are (ε, δ)-DP with respect to that client's
examples; everything downstream (aggregation, other rounds) is post-processing. ε is composed over
*all* the rounds the client trained by one accountant whose history (``PrivacyState.history``)
the client persists between rounds — a fresh ``PrivacyEngine`` is built per round (a Flower client
process may not outlive a round), its accountant restored from that history. The reported ε is
recomputed from the history by a fresh Opacus accountant, so anyone can check it.

Design points (and the traps they avoid, opacus#820, opacus#688, peft#3409):

- Only ``requires_grad`` parameters are private-trained: LoRA ``lora_a``/``lora_b`` (LoRA-SB:
  ``lora_r``) and the head. The frozen base is skipped by Opacus because it is frozen.
- ``make_private(..., wrap_model=False)``: hooks on the original model, no ``_module.`` prefix in
  ``state_dict`` keys. The model is moved to its device *before* the optimizer and the hooks are
  made, and the hooks are removed after every round (also on error), so nothing is wrapped twice.
- A round that took optimizer steps but left every trainable parameter unchanged is an error
  (adapters that never move while ε grows is the classic symptom of a wrong wrapping order).
- The accountant must record exactly the steps taken; a mismatch is an error.
- Empty Poisson batches are not skipped: they are noise-only steps, counted by the accountant
  (skipping them would condition the sampling on non-empty batches, which the analysis does not
  cover).
- With a target ε the noise multiplier is calibrated once, for ``planned_total_steps`` (planned
  rounds × local steps) at the client's sample rate, and stored in the state; a round that would
  push ε past the target is declined before any training (``declined=True``).
- Sampling and noise use fresh OS entropy unless ``seed`` is given. A known seed makes runs
  reproducible (tests) but voids the guarantee: whoever knows it knows the batches and the noise.
  Opacus' ``secure_mode`` (torchcsprng) is not used.

Accountants: ``rdp`` (default) and ``prv`` (tighter); Opacus' ``gdp`` is an asymptotic
approximation and is refused.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from fedlora.lora import trainable_parameters
from fedlora.train import OptimConfig, TrainResult, resolve_device, train_local

#: Accountants accepted in ``PrivacyConfig.accountant``.
ACCOUNTANTS = ("rdp", "prv")
#: Per-sample gradient modes that work with ``wrap_model=False`` and a plain loss
#: (``ghost`` needs Opacus' wrapped criterion, ``ew`` needs a wrapped model).
GRAD_SAMPLE_MODES = ("hooks", "functorch")
#: A round is declined when ε after it would exceed ``target_epsilon + EPSILON_TOLERANCE``.
EPSILON_TOLERANCE = 1e-6

History = list[tuple[float, float, int]]


# ---- configuration ------------------------------------------------------------------------------

@dataclass
class PrivacyConfig:
    """Sample-level DP for each client's local training (Opacus DP-SGD).

    - ``enabled``: DP on or off. Nothing else is checked while it is off.
    - ``target_epsilon``: ε budget per client over the whole run (planned rounds × local steps);
      the noise multiplier is calibrated for it once. Exactly one of ``target_epsilon`` and
      ``noise_multiplier`` when enabled.
    - ``noise_multiplier``: σ, fixed; ε is then whatever it adds up to (reported, never declined).
    - ``max_grad_norm``: per-sample clipping bound C (> 0); noise std is σ·C.
    - ``delta``: δ per client; default ``1/(10·n_i)``. Must be < ``1/n_i`` (a δ of 1/n allows
      publishing one example outright), so it is checked against each client's size.
    - ``accountant``: ``"rdp"`` (default) or ``"prv"``.
    - ``poisson_sampling``: Poisson batches (what the accountant assumes). ``False`` uses shuffled
      fixed-size batches and accounts them as if Poisson — an approximation, not a guarantee.
    - ``grad_sample_mode``: Opacus per-sample gradient mode, ``"hooks"`` or ``"functorch"``.
    """

    enabled: bool = False
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    delta: float | None = None
    accountant: str = "rdp"
    poisson_sampling: bool = True
    grad_sample_mode: str = "hooks"

    @classmethod
    def from_dict(cls, d: Mapping | None) -> PrivacyConfig:
        """From a flat mapping (a TOML ``[privacy]`` table or Flower run config): keys are the field
        names, ``-`` or ``_``; a missing key keeps the default (run configs cannot hold None).
        Unknown keys raise ``ValueError``. Not validated here: call ``validate``."""
        names = set(cls.__dataclass_fields__)
        kw = {}
        for k, v in dict(d or {}).items():
            name = str(k).replace("-", "_")
            if name not in names:
                raise ValueError(f"unknown privacy setting {k!r}; known: {sorted(names)}")
            kw[name] = v
        return cls(**kw)

    def validate(self, num_examples: int | None = None) -> None:
        """Raise ``ValueError`` naming the offending field; ``num_examples`` (n_i) checks δ < 1/n_i."""
        if not self.enabled:
            return
        p = "privacy"
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(f"{p}.target_epsilon / {p}.noise_multiplier: give exactly one of them "
                             f"when privacy is enabled (got target_epsilon={self.target_epsilon!r}, "
                             f"noise_multiplier={self.noise_multiplier!r})")
        if self.target_epsilon is not None and not _positive(self.target_epsilon):
            raise ValueError(f"{p}.target_epsilon must be a finite number > 0, "
                             f"got {self.target_epsilon!r}")
        if self.noise_multiplier is not None and not _positive(self.noise_multiplier):
            raise ValueError(f"{p}.noise_multiplier must be a finite number > 0 (0 means no "
                             f"privacy), got {self.noise_multiplier!r}")
        if not _positive(self.max_grad_norm):
            raise ValueError(f"{p}.max_grad_norm must be a finite number > 0, "
                             f"got {self.max_grad_norm!r}")
        if self.delta is not None and not (_positive(self.delta) and self.delta < 1):
            raise ValueError(f"{p}.delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"{p}.accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}"
                             + (" (gdp is an asymptotic approximation, not a guarantee)"
                                if self.accountant == "gdp" else ""))
        if not isinstance(self.poisson_sampling, bool):
            raise ValueError(f"{p}.poisson_sampling must be true or false, "
                             f"got {self.poisson_sampling!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"{p}.grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, "
                             f"got {self.grad_sample_mode!r}")
        if num_examples is not None:
            self.resolved_delta(num_examples)

    def resolved_delta(self, n: int) -> float:
        """δ for a client with ``n`` examples: ``delta`` or ``1/(10·n)``; ``ValueError`` unless < 1/n."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"a DP client needs at least one example, got num_examples={n!r}")
        if self.delta is None:
            return 1.0 / (10 * n)
        if self.delta >= 1.0 / n:
            raise ValueError(f"privacy.delta={self.delta:g} is not below 1/n_i = 1/{n} = {1 / n:g} "
                             f"for a client with {n} examples; use a smaller delta (default: "
                             f"1/(10·n_i) = {1 / (10 * n):g})")
        return float(self.delta)


def _positive(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# ---- persisted per-client state -----------------------------------------------------------------

@dataclass
class PrivacyState:
    """What a client persists across rounds.

    ``history`` is the accountant's history, as Opacus keeps it: ``(noise_multiplier,
    sample_rate, steps)`` entries. ``noise_multiplier`` is σ, calibrated (or taken from the
    config) on the first round and fixed for the run. ``to_dict``/``from_dict`` use flat lists of
    floats/ints only, so the dict fits a Flower ``ConfigRecord`` (``context.state``) as is.
    """

    history: History = field(default_factory=list)
    noise_multiplier: float | None = None

    @property
    def total_steps(self) -> int:
        return sum(s for _, _, s in self.history)

    def to_dict(self) -> dict:
        d: dict = {
            "noise_multipliers": [float(s) for s, _, _ in self.history],
            "sample_rates": [float(q) for _, q, _ in self.history],
            "steps": [int(n) for _, _, n in self.history],
        }
        if self.noise_multiplier is not None:
            d["noise_multiplier"] = float(self.noise_multiplier)
        return d

    @classmethod
    def from_dict(cls, d: Mapping | None, max_entries: int | None = None) -> PrivacyState:
        """Inverse of ``to_dict``; ``{}``/``None`` is a fresh client (no history). ``max_entries``:
        the most history entries it may hold (one per round trained at most, as ``_extend`` merges
        a round's steps into one entry): a client's reply is untrusted."""
        d = dict(d or {})
        sig = list(d.get("noise_multipliers", []))
        qs = list(d.get("sample_rates", []))
        ns = list(d.get("steps", []))
        if not len(sig) == len(qs) == len(ns):
            raise ValueError(f"privacy state: noise_multipliers/sample_rates/steps have different "
                             f"lengths ({len(sig)}, {len(qs)}, {len(ns)})")
        if max_entries is not None and len(sig) > max_entries:
            raise ValueError(f"privacy state: {len(sig)} history entries, more than the {max_entries} "
                             "rounds so far")
        history = [(float(s), float(q), int(n)) for s, q, n in zip(sig, qs, ns)]
        for s, q, n in history:
            if not (math.isfinite(s) and s >= 0 and 0 < q <= 1 and n >= 0):
                raise ValueError(f"privacy state: bad history entry (sigma={s}, q={q}, steps={n})")
        nm = d.get("noise_multiplier")
        if nm is not None and (isinstance(nm, bool) or not isinstance(nm, int | float)
                               or not math.isfinite(nm) or nm < 0):
            raise ValueError(f"privacy state: noise_multiplier must be a finite number >= 0, got {nm!r}")
        return cls(history, None if nm is None else float(nm))


# ---- accounting ---------------------------------------------------------------------------------

def _accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ValueError(f"privacy.accountant must be one of {ACCOUNTANTS}, got {name!r}")


def epsilon(history: Iterable[tuple[float, float, int]], delta: float,
            accountant: str = "rdp") -> float:
    """ε after ``history`` at ``delta``, from a fresh Opacus accountant (0 for an empty history)."""
    acc = _accountant(accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    if not acc.history:
        return 0.0
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(cfg: PrivacyConfig, sample_rate: float, total_steps: int,
                    delta: float) -> float:
    """σ such that ``total_steps`` steps at ``sample_rate`` spend at most ``cfg.target_epsilon``.

    Opacus' ``get_noise_multiplier`` (binary search, tolerance 0.01 in ε, result on the safe side).
    """
    from opacus.accountants.utils import get_noise_multiplier

    if cfg.target_epsilon is None:
        raise ValueError("calibrate_noise needs privacy.target_epsilon")
    if cfg.accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant must be one of {ACCOUNTANTS}, got {cfg.accountant!r}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"planned total steps must be an integer >= 1, got {total_steps!r}")
    try:
        with warnings.catch_warnings():  # the search visits tiny ε where RDP's alpha grid ends
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(get_noise_multiplier(target_epsilon=cfg.target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=total_steps,
                                              accountant=cfg.accountant,
                                              epsilon_tolerance=0.01))
    except ValueError as e:
        floor = smallest_epsilon(sample_rate, total_steps, delta, cfg.accountant)
        raise ValueError(f"privacy.target_epsilon={cfg.target_epsilon} cannot be met for "
                         f"{total_steps} steps at sample rate {sample_rate:g}, delta {delta:g}: the "
                         f"smallest ε this plan can reach is {floor:.4g} (no noise multiplier goes "
                         "lower); raise privacy.target_epsilon above it, or plan fewer rounds × "
                         "train.local_steps, a smaller train.batch_size or a larger privacy.delta") from e


def smallest_epsilon(sample_rate: float, total_steps: int, delta: float, accountant: str = "rdp") -> float:
    """The ε a plan reaches with the largest noise Opacus' calibration tries (its ``MAX_SIGMA``):
    no target below it can be met (for RDP the floor comes from its finite grid of orders)."""
    from opacus.accountants.utils import MAX_SIGMA

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return epsilon([(float(MAX_SIGMA), float(sample_rate), int(total_steps))], delta, accountant)


@dataclass
class ClientPlan:
    """What one client's DP training spends over the planned run (``plan_client``)."""

    num_examples: int
    sample_rate: float  # q = batch_size / n (Poisson)
    steps: int  # planned rounds × local steps
    noise_multiplier: float  # σ: fixed, or calibrated for target_epsilon
    epsilon: float
    delta: float


def plan_client(cfg: PrivacyConfig, num_examples: int, batch_size: int, total_steps: int) -> ClientPlan:
    """σ, q, ε and δ of a client with ``num_examples`` examples, before any training (the same
    calibration ``train_private`` makes); ``ValueError`` naming the smallest feasible ε when a
    target cannot be met."""
    delta = cfg.resolved_delta(num_examples)
    q = min(1.0, batch_size / num_examples)
    sigma = cfg.noise_multiplier if cfg.noise_multiplier is not None else calibrate_noise(
        cfg, q, total_steps, delta)
    eps = epsilon([(float(sigma), q, int(total_steps))], delta, cfg.accountant)
    return ClientPlan(num_examples, q, int(total_steps), float(sigma), eps, delta)


def _extend(history: History, sigma: float, q: float, steps: int) -> History:
    """The history after ``steps`` more steps, merged the way Opacus' accountants merge it."""
    h = [tuple(e) for e in history]
    if steps <= 0:
        return h
    if h and h[-1][0] == sigma and h[-1][1] == q:
        h[-1] = (sigma, q, h[-1][2] + steps)
    else:
        h.append((sigma, q, steps))
    return h


# ---- model checks -------------------------------------------------------------------------------

_FIX = ("freeze it (requires_grad_(False)), or replace it by layers Opacus supports: for attention, "
        "separate q/k/v/o nn.Linear (adapt those with LoRA); otherwise "
        "opacus.validators.ModuleValidator.fix(model) swaps in DP-compatible layers "
        "(e.g. nn.MultiheadAttention -> DPMultiheadAttention; do not put LoRA inside its linears)")


def check_dp_compatible(model: nn.Module) -> None:
    """``ValueError`` naming every trainable module Opacus cannot handle, and the fix.

    Runs ``opacus.validators.ModuleValidator.validate`` on each trainable module (frozen modules
    are ignored, as Opacus ignores them), refuses trainable modules with buffers, and refuses a
    model that already carries Opacus hooks or wrapping (a double wrap).
    """
    from opacus.grad_sample import AbstractGradSampleModule
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    if isinstance(model, AbstractGradSampleModule):
        raise ValueError("the model is already an Opacus GradSampleModule: pass the plain model; "
                         "train_private attaches (and removes) Opacus hooks itself each round")
    if hasattr(model, "autograd_grad_sample_hooks"):
        raise ValueError("the model still carries Opacus grad-sample hooks from an earlier privacy "
                         "session (double wrap); remove them (hooks.cleanup()) before training")
    if not trainable_parameters(model):
        raise ValueError("no trainable parameters: inject LoRA (or name a trainable head) first")
    problems: list[str] = []
    was_training = {m: m.training for m in model.modules()}
    model.train()
    try:
        for name, m in trainable_modules(model):
            label = f"{name or '<root>'} ({type(m).__name__})"
            for err in ModuleValidator.validate(m, strict=False):
                msg = f"{label}: {err}"
                if msg not in problems:
                    problems.append(msg)
            buffers = [b for b, _ in m.named_buffers()]
            if buffers:
                problems.append(f"{label}: a trainable module with buffers {buffers} (buffers are "
                                "not privatised)")
    finally:
        for m, t in was_training.items():
            m.training = t
    if problems:
        raise ValueError("Opacus cannot train these trainable modules privately:\n  - "
                         + "\n  - ".join(problems) + f"\nFix: {_FIX}.")


# ---- training -----------------------------------------------------------------------------------

@dataclass
class PrivateTrainResult:
    """One DP round of one client.

    ``epsilon`` is ε so far (all rounds this client trained, this one included) at ``delta``;
    ``state`` is the state to persist. ``declined``: the round would have exceeded the target ε,
    so nothing was trained (``train.steps == 0``; ``state`` is the input state) and ``reason``
    says why. ``noise_multiplier`` (σ) and ``sample_rate`` (q) are the ones used or planned.
    """

    train: TrainResult
    epsilon: float
    delta: float
    state: PrivacyState
    declined: bool = False
    reason: str | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None

    def metrics(self) -> dict[str, float | int]:
        """Flat numbers for a Flower ``MetricRecord``."""
        return {"epsilon": float(self.epsilon), "delta": float(self.delta),
                "dp_declined": int(self.declined),
                "noise_multiplier": float(self.noise_multiplier or 0.0),
                "sample_rate": float(self.sample_rate or 0.0)}


_EMPTY_BATCH = {"labels": torch.zeros(0, dtype=torch.long)}


class _EmptyAware:
    """Re-iterable view of a loader that turns any empty batch into ``{"labels": <0 rows>}``.

    (Opacus returns ``[]`` when the very first Poisson batch of a loader is empty.)
    """

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator:
        for b in self.loader:
            if isinstance(b, Mapping):
                yield b if b["labels"].shape[0] > 0 else _EMPTY_BATCH
            elif len(b) == 0:
                yield _EMPTY_BATCH
            else:
                raise TypeError(f"DP training expects dict batches with 'labels', got {type(b)}")


def _resolve_sigma(cfg: PrivacyConfig, state: PrivacyState, q: float, planned: int,
                   delta: float) -> float:
    if cfg.noise_multiplier is not None:
        if state.noise_multiplier is not None and state.noise_multiplier != cfg.noise_multiplier:
            raise ValueError(f"privacy.noise_multiplier={cfg.noise_multiplier} differs from the "
                             f"{state.noise_multiplier} this client used in earlier rounds; the "
                             "noise is fixed for the run")
        return float(cfg.noise_multiplier)
    if state.noise_multiplier is not None:
        return float(state.noise_multiplier)
    return calibrate_noise(cfg, q, planned, delta)


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()  # non-deterministic (OS entropy)
    else:
        g.manual_seed(seed)
    return g


def train_private(model: nn.Module, dataset: Dataset, *, cfg: PrivacyConfig, state: PrivacyState,
                  batch_size: int, steps: int, planned_total_steps: int, optim: OptimConfig,
                  device: str | torch.device = "auto", collate_fn=None,
                  seed: int | None = None, before_step=None) -> PrivateTrainResult:
    """One client's DP round: ``steps`` DP-SGD steps over ``dataset`` with Opacus.

    - ``batch_size``: the expected Poisson batch size; the sample rate is ``q = batch_size / n``.
    - ``steps``: optimizer steps this round (empty Poisson batches are noise-only steps and count).
    - ``planned_total_steps``: planned rounds × local steps — the most this client could train in
      the run — for calibrating σ to ``cfg.target_epsilon`` (used on the client's first round
      only; σ is then kept in the state).
    - ``state``: the persisted ``PrivacyState`` (``PrivacyState()`` on the first round); not
      modified — the new one is in the result.
    - ``collate_fn``: builds dict batches (``input_ids``, ``attention_mask``, ``labels``) from
      examples; default collation otherwise.
    - ``seed``: ``None`` (default) draws batches and noise from OS entropy. A fixed seed is for
      tests only (a known seed reveals the batches and the noise).
    - ``before_step(optimizer)``: a data-independent step before each DP step (``train_local``),
      e.g. a rank-pruning penalty: post-processing, outside the clipping and the noise.

    Raises ``ValueError`` for a bad config or a model Opacus cannot handle (before any training),
    and ``RuntimeError`` when steps were taken but no trainable parameter changed, or when the
    accountant did not record exactly the steps taken. On any error during training the trainable
    parameters are put back as they were, so steps missing from the returned history never reach
    the model.
    """
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    if not cfg.enabled:
        raise ValueError("privacy.enabled is false: train with fedlora.train.train_local instead")
    n = len(dataset)
    cfg.validate(n)
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an integer in [1, {n}] (n = client examples), "
                         f"got {batch_size!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(planned_total_steps, int) or planned_total_steps < 1:
        raise ValueError(f"planned_total_steps must be an integer >= 1, got {planned_total_steps!r}")
    check_dp_compatible(model)
    dev = resolve_device(device)

    q = batch_size / n
    delta = cfg.resolved_delta(n)
    sigma = _resolve_sigma(cfg, state, q, planned_total_steps, delta)
    if cfg.target_epsilon is not None:
        eps_after = epsilon(_extend(state.history, sigma, q, steps), delta, cfg.accountant)
        if eps_after > cfg.target_epsilon + EPSILON_TOLERANCE:
            eps_now = epsilon(state.history, delta, cfg.accountant)
            reason = (f"privacy budget spent: epsilon is {eps_now:.4g} after {state.total_steps} "
                      f"steps; {steps} more would make it {eps_after:.4g} > target "
                      f"{cfg.target_epsilon:g} (delta {delta:.3g}); declined, nothing trained")
            return PrivateTrainResult(TrainResult(0.0, 0, 0, 0.0), eps_now, delta,
                                      PrivacyState(list(state.history), sigma), True, reason,
                                      sigma, q)

    # Order matters (opacus#820): device first, then optimizer, then hooks.
    model.to(dev).train()
    params = trainable_parameters(model)
    before = [p.detach().clone() for p in params]
    sample_gen = _generator(seed, torch.device("cpu"))
    noise_gen = _generator(None if seed is None else seed + 1, dev)
    if cfg.poisson_sampling:
        loader: DataLoader = DPDataLoader(dataset, sample_rate=q, collate_fn=collate_fn,
                                          generator=sample_gen)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_fn,
                            generator=sample_gen)
    hooks = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        warnings.filterwarnings("ignore", message=".*PrivacyEngine detected new dataset.*")
        engine = PrivacyEngine(accountant=cfg.accountant)
        engine.accountant.history = [tuple(e) for e in state.history]
        try:
            # poisson_sampling=False here: the loader above already is the Poisson one. Opacus'
            # own re-wrap would compute q as 1/int(1/q), which is not always q (1/int(1/(1/93))
            # = 1/92), so the accounting hook is attached with the exact q below.
            hooks, dp_opt, loader = engine.make_private(
                module=model, optimizer=optim.build(params), data_loader=loader,
                noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm, poisson_sampling=False,
                grad_sample_mode=cfg.grad_sample_mode, wrap_model=False, noise_generator=noise_gen)
            if cfg.poisson_sampling:
                hooks.forbid_grad_accumulation()
            dp_opt.expected_batch_size = batch_size  # loss mean over the expected batch (n·q)
            dp_opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=q))

            def noise_only_step() -> None:  # an empty Poisson batch: zero per-sample grads
                for p in dp_opt.params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)

            res = train_local(model, _EmptyAware(loader), steps=steps, optimizer=dp_opt,
                              device=dev, on_empty_batch=noise_only_step, before_step=before_step)
            new_history = [(float(s), float(r), int(k)) for s, r, k in engine.accountant.history]
            taken = sum(k for _, _, k in new_history) - state.total_steps
            if taken != res.steps:
                raise RuntimeError(
                    f"the accountant recorded {taken} steps but {res.steps} optimizer steps were "
                    "taken: the DP optimizer is not the one that stepped, or the privacy engine "
                    "is attached twice")
            if res.steps >= 1 and all(torch.equal(b, p.detach()) for b, p in zip(before, params)):
                raise RuntimeError(
                    f"DP training took {res.steps} steps but no trainable parameter changed "
                    "(opacus#820 / peft#3409): the optimizer does not update the parameters the "
                    "model uses — usually the model was moved to another device or re-wrapped "
                    "after the optimizer/privacy engine was built, or it was wrapped twice. Build "
                    "the model on its device first, then call train_private on the plain "
                    "(unwrapped) model")
        except BaseException:
            # Steps that will not reach the persisted history must not reach the model either.
            with torch.no_grad():
                for b, p in zip(before, params):
                    p.copy_(b)
            raise
        finally:
            if hooks is not None:
                hooks.cleanup()
            for p in params:
                p.grad = None
    new_state = PrivacyState(new_history, sigma)
    return PrivateTrainResult(res, epsilon(new_history, delta, cfg.accountant), delta, new_state,
                              False, None, sigma, q)
