"""``fedlora dp plan``: each client's DP budget for a run, before any training.

Per client: its training examples n_i (its partition, built as the run builds it), the Poisson
sample rate ``q = batch_size / n_i``, the planned steps (rounds × local steps), the noise
multiplier σ (fixed, or calibrated for ``privacy.target_epsilon`` as the client will calibrate
it), and the ε and δ that plan spends — from Opacus' accountants (``fedlora.privacy``).
"""

from __future__ import annotations

from fedlora import rundata
from fedlora.config import RunConfig
from fedlora.privacy import ClientPlan, PrivacyConfig, plan_client


def plan_run(cfg: RunConfig) -> list[tuple[str, ClientPlan]]:
    """``[(client id, plan)]`` for every client of the run; ``ValueError`` when DP is off or a
    client's budget cannot be met (naming the smallest feasible ε)."""
    pc = PrivacyConfig.from_dict(cfg.privacy)
    if not pc.enabled:
        raise ValueError("privacy.enabled is false: there is no budget to plan (set "
                         "privacy.enabled = true and privacy.target_epsilon or noise_multiplier)")
    pc.validate()
    spec = cfg.client_spec()
    steps = cfg.rounds * cfg.train.local_steps
    out = []
    for pid in range(cfg.clients.num):
        train, _ = rundata.client_data(spec, pid, cfg.clients.num)
        try:
            out.append((f"client-{pid}", plan_client(pc, len(train), cfg.train.batch_size, steps)))
        except ValueError as e:
            raise ValueError(f"client-{pid} ({len(train)} examples): {e}") from e
    return out
