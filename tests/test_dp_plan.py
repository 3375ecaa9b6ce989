"""DP budgets checked before training: infeasible targets are config errors, `dp plan` matches Opacus."""

from __future__ import annotations

import pytest

from fedlora.config import load_config
from fedlora.privacy import epsilon, smallest_epsilon


def test_an_unreachable_target_is_a_config_error_naming_the_smallest_epsilon():
    with pytest.raises(ValueError, match="smallest ε this plan can reach is") as e:
        load_config(None, values={"privacy.enabled": True, "privacy.target_epsilon": 1e-6})
    floor = float(str(e.value).split("reach is ")[1].split(" ")[0])
    # the floor is what Opacus' accountant gives at its largest noise, for this plan
    assert floor == pytest.approx(smallest_epsilon(32 / 256, 3 * 10, 1 / 2560), rel=1e-3)
    assert floor > 1e-6
    load_config(None, values={"privacy.enabled": True, "privacy.target_epsilon": 2 * floor})


def test_dp_plan_per_client_equals_a_fresh_accountant():
    from fedlora.dp_plan import plan_run

    cfg = load_config(None, values={"privacy.enabled": True, "privacy.target_epsilon": 4.0,
                                    "clients.num": 3, "data.partition": "dirichlet"})
    plans = plan_run(cfg)
    assert [c for c, _ in plans] == ["client-0", "client-1", "client-2"]
    for _, p in plans:
        assert p.steps == cfg.rounds * cfg.train.local_steps
        assert p.sample_rate == pytest.approx(min(1.0, cfg.train.batch_size / p.num_examples))
        assert p.delta == pytest.approx(1 / (10 * p.num_examples))
        assert p.epsilon == pytest.approx(epsilon([(p.noise_multiplier, p.sample_rate, p.steps)], p.delta))
        assert 4.0 - 0.011 <= p.epsilon <= 4.0  # calibrated on the safe side, Opacus' tolerance
    fixed = load_config(None, values={"privacy.enabled": True, "privacy.noise_multiplier": 1.3})
    assert all(p.noise_multiplier == 1.3 for _, p in plan_run(fixed))
    with pytest.raises(ValueError, match="privacy.enabled is false"):
        plan_run(load_config(None))
