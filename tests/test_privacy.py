"""Differential privacy on Opacus: honest ε across rounds, real clipping and noise, budgets, guards."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.optimizers import DPOptimizer

from fedlora.lora import LoRAConfig, inject_lora, lora_layers
from fedlora.models import get_model
from fedlora.privacy import (
    PrivacyConfig,
    PrivacyState,
    calibrate_noise,
    check_dp_compatible,
    epsilon,
    train_private,
)
from fedlora.synthetic import SyntheticTask, TensorDictDataset, make_loader
from fedlora.train import OptimConfig, evaluate

TASK = SyntheticTask()


def _adapted(mode: str = "lora", seed: int = 0) -> nn.Module:
    model = get_model("tiny", seed=seed)
    inject_lora(model, LoRAConfig(targets=["attn.q", "attn.v"], rank=4,
                                  alpha=4 if mode == "sb" else 8, mode=mode, trainable=["head"]))
    if mode == "sb":  # LoRA-SB: frozen orthonormal B, A (as the SVD init gives), train R only
        g = torch.Generator().manual_seed(seed)
        for layer in lora_layers(model).values():
            r, k, d = layer.rank, layer.in_features, layer.out_features
            A = torch.linalg.qr(torch.randn(k, r, generator=g))[0].T.contiguous()
            B = torch.linalg.qr(torch.randn(d, r, generator=g))[0].contiguous()
            layer.set_factors_(A=A, B=B, R=torch.zeros(r, r))
    return model


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _cfg(**kw) -> PrivacyConfig:
    return PrivacyConfig(enabled=True, **kw)


def _via_config_record(state: PrivacyState) -> PrivacyState:
    """What a Flower client does between rounds: context.state ConfigRecord and back."""
    from flwr.app import ConfigRecord

    return PrivacyState.from_dict(dict(ConfigRecord(state.to_dict())))


# ---- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [
    (dict(target_epsilon=3.0, noise_multiplier=1.0), "target_epsilon / privacy.noise_multiplier"),
    (dict(), "target_epsilon / privacy.noise_multiplier"),
    (dict(noise_multiplier=1.0, delta=0.02), "delta"),          # n = 100: 0.02 > 1/n
    (dict(noise_multiplier=1.0, delta=0.01), "delta"),          # = 1/n: not below it
    (dict(noise_multiplier=1.0, max_grad_norm=0.0), "max_grad_norm"),
    (dict(noise_multiplier=1.0, max_grad_norm=-1.0), "max_grad_norm"),
    (dict(noise_multiplier=1.0, accountant="moments"), "accountant"),
    (dict(noise_multiplier=1.0, accountant="gdp"), "accountant"),
    (dict(target_epsilon=-1.0), "target_epsilon"),
    (dict(noise_multiplier=0.0), "noise_multiplier"),
    (dict(noise_multiplier=1.0, grad_sample_mode="ghost"), "grad_sample_mode"),
])
def test_bad_config_is_refused_before_any_training(kw, field):
    cfg = _cfg(**kw)
    with pytest.raises(ValueError, match=f"privacy.{field}"):
        cfg.validate(num_examples=100)
    model = _adapted()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=f"privacy.{field}"):
        train_private(model, TASK.generate(100, seed=1), cfg=cfg, state=PrivacyState(),
                      batch_size=10, steps=2, planned_total_steps=2, optim=OptimConfig(),
                      device="cpu", seed=0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_delta_default_and_disabled_config():
    cfg = _cfg(noise_multiplier=1.0)
    assert cfg.resolved_delta(1000) == pytest.approx(1e-4)
    assert _cfg(noise_multiplier=1.0, delta=1e-5).resolved_delta(1000) == 1e-5
    with pytest.raises(ValueError, match="at least one example"):
        cfg.resolved_delta(0)
    PrivacyConfig(enabled=False, accountant="whatever").validate(10)  # off: nothing to check
    with pytest.raises(ValueError, match="enabled is false"):
        train_private(_adapted(), TASK.generate(20), cfg=PrivacyConfig(), state=PrivacyState(),
                      batch_size=4, steps=1, planned_total_steps=1, optim=OptimConfig())


def test_state_round_trips_through_a_flower_config_record():
    st = PrivacyState([(1.25, 0.05, 10), (0.9, 0.1, 3)], 1.25)
    assert _via_config_record(st) == st
    assert PrivacyState.from_dict({}) == PrivacyState() == _via_config_record(PrivacyState())
    with pytest.raises(ValueError, match="different lengths"):
        PrivacyState.from_dict({"noise_multipliers": [1.0], "sample_rates": [], "steps": [1]})


# ---- accounting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("accountant, fresh", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_equals_a_fresh_opacus_accountant_across_rounds(accountant, fresh):
    data = TASK.generate(200, seed=1)
    cfg = _cfg(noise_multiplier=1.1, accountant=accountant, max_grad_norm=0.5)
    model, state, eps = _adapted(), PrivacyState(), []
    for rnd in range(1, 4):
        res = train_private(model, data, cfg=cfg, state=state, batch_size=16, steps=4,
                            planned_total_steps=12, optim=OptimConfig(lr=1e-2), device="cpu",
                            seed=rnd)
        assert not res.declined and res.train.steps == 4
        assert res.state.history == [(1.1, 16 / 200, 4 * rnd)]  # one accountant, whole run
        assert res.delta == pytest.approx(1 / 2000)
        acc = fresh()
        acc.history = list(res.state.history)
        assert res.epsilon == pytest.approx(acc.get_epsilon(delta=res.delta), rel=1e-12)
        assert res.epsilon == epsilon(res.state.history, res.delta, accountant)
        eps.append(res.epsilon)
        state = _via_config_record(res.state)  # persisted between rounds as Flower would
    assert eps[0] < eps[1] < eps[2]
    assert not hasattr(model, "autograd_grad_sample_hooks")  # nothing left attached
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())


def test_calibrated_noise_meets_the_target_over_the_planned_steps():
    cfg = _cfg(target_epsilon=3.0)
    sigma = calibrate_noise(cfg, 0.0625, 48, 1e-5)
    eps = epsilon([(sigma, 0.0625, 48)], 1e-5)
    assert 2.95 < eps <= 3.0
    assert sigma == pytest.approx(1.121, abs=0.01)  # Opacus' own make_private_with_epsilon value


def test_budget_exhaustion_declines_the_extra_round():
    data = TASK.generate(200, seed=1)
    cfg = _cfg(target_epsilon=4.0)
    model, state = _adapted(), PrivacyState()
    for _ in range(2):  # the two planned rounds train
        res = train_private(model, data, cfg=cfg, state=state, batch_size=20, steps=5,
                            planned_total_steps=10, optim=OptimConfig(lr=1e-2), device="cpu",
                            seed=0)
        assert not res.declined and res.train.steps == 5
        state = _via_config_record(res.state)
    assert 3.9 < res.epsilon <= 4.0
    assert state.noise_multiplier == res.noise_multiplier  # calibrated once, kept
    before = _snapshot(model)
    third = train_private(model, data, cfg=cfg, state=state, batch_size=20, steps=5,
                          planned_total_steps=10, optim=OptimConfig(lr=1e-2), device="cpu", seed=0)
    assert third.declined and "budget" in third.reason and "4" in third.reason
    assert third.train.steps == 0 and third.epsilon == res.epsilon
    assert third.state == state
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert third.metrics()["dp_declined"] == 1


def test_noise_multiplier_is_fixed_for_the_run():
    data = TASK.generate(50, seed=1)
    with pytest.raises(ValueError, match="fixed for the run"):
        train_private(_adapted(), data, cfg=_cfg(noise_multiplier=2.0),
                      state=PrivacyState([(1.0, 0.2, 3)], 1.0), batch_size=10, steps=1,
                      planned_total_steps=1, optim=OptimConfig(), device="cpu")


# ---- what the optimizer really does -------------------------------------------------------------

def test_per_sample_gradients_are_clipped_and_noise_is_added(monkeypatch):
    seen: list[dict] = []
    clip0, noise0 = DPOptimizer.clip_and_accumulate, DPOptimizer.add_noise

    def clip(self):
        seen.append({"raw": [g.detach().clone() for g in self.grad_samples],
                     "plain": [p.grad.detach().clone() for p in self.params],
                     "C": self.max_grad_norm, "sigma": self.noise_multiplier})
        clip0(self)
        seen[-1]["summed"] = [p.summed_grad.detach().clone() for p in self.params]

    def noise(self):
        noise0(self)
        seen[-1]["noised"] = [p.grad.detach().clone() for p in self.params]

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", clip)
    monkeypatch.setattr(DPOptimizer, "add_noise", noise)
    C, sigma = 0.05, 1.0
    res = train_private(_adapted(), TASK.generate(200, seed=1),
                        cfg=_cfg(noise_multiplier=sigma, max_grad_norm=C), state=PrivacyState(),
                        batch_size=20, steps=4, planned_total_steps=4,
                        optim=OptimConfig(lr=1e-2), device="cpu", seed=3)
    assert len(seen) == res.train.steps == 4
    noise_all = []
    for s in seen:
        assert s["C"] == C and s["sigma"] == sigma
        b = s["raw"][0].shape[0]
        assert b > 0
        # these are genuine per-sample gradients: their mean is the ordinary batch gradient
        for raw, plain in zip(s["raw"], s["plain"]):
            torch.testing.assert_close(raw.sum(0) / b, plain, atol=1e-6, rtol=1e-4)
        norms = torch.stack([g.reshape(b, -1).norm(dim=1) for g in s["raw"]], 1).norm(dim=1)
        factor = (C / (norms + 1e-6)).clamp(max=1.0)
        assert (norms > C).any(), "clipping was never active: pick a smaller C"
        assert (norms * factor <= C * (1 + 1e-5)).all()  # every clipped per-sample norm <= C
        for raw, summed in zip(s["raw"], s["summed"]):  # the optimizer used the clipped sum
            torch.testing.assert_close(summed, torch.einsum("i,i...", factor, raw),
                                       atol=1e-7, rtol=1e-5)
        total = torch.cat([g.flatten() for g in s["summed"]]).norm()
        assert total <= b * C * (1 + 1e-5)
        noise_all.append(torch.cat([(n - g).flatten() for n, g in zip(s["noised"], s["summed"])]))
    z = torch.cat(noise_all)
    assert z.abs().max() > 0
    assert z.std().item() == pytest.approx(sigma * C, rel=0.1)  # N(0, (σC)²) per coordinate
    assert abs(z.mean().item()) < 0.1 * sigma * C


def test_empty_poisson_batches_are_counted_noise_only_steps(monkeypatch):
    sizes: list[int] = []
    clip0 = DPOptimizer.clip_and_accumulate

    def clip(self):
        sizes.append(len(self.grad_samples[0]))
        clip0(self)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", clip)
    # n = 4, expected batch 1: about a third of the Poisson batches are empty
    res = train_private(_adapted(), TASK.generate(4, seed=1), cfg=_cfg(noise_multiplier=1.0),
                        state=PrivacyState(), batch_size=1, steps=30, planned_total_steps=30,
                        optim=OptimConfig(lr=1e-3), device="cpu", seed=0)
    assert res.train.steps == 30 == res.state.total_steps == len(sizes)
    assert res.state.history == [(1.0, 0.25, 30)]
    assert sizes.count(0) >= 3  # empty draws were taken as (noise-only) steps and counted
    assert res.train.num_examples == sum(sizes)


# ---- learning under DP --------------------------------------------------------------------------

def _learns_at_epsilon_8(mode: str, device: str) -> None:
    model = _adapted(mode)
    train, test = TASK.generate(1000, seed=1), make_loader(TASK.generate(400, seed=2), 200, False)
    before_acc = evaluate(model, test, device=device).accuracy
    frozen0 = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cfg, state = _cfg(target_epsilon=8.0), PrivacyState()
    for rnd in range(2):
        res = train_private(model, train, cfg=cfg, state=state, batch_size=50, steps=50,
                            planned_total_steps=100, optim=OptimConfig(lr=2e-2), device=device,
                            seed=rnd)
        assert not res.declined
        state = res.state
    assert 7.5 < res.epsilon <= 8.0
    acc = evaluate(model, test, device=device).accuracy
    assert acc > 0.8 and acc > before_acc + 0.2, (before_acc, acc)
    for n, p in model.named_parameters():
        assert p.device.type == torch.device(device).type
        if not p.requires_grad:
            assert torch.equal(p, frozen0[n]), f"frozen {n} moved under DP"
    if mode == "sb":  # R moved, the frozen orthonormal factors did not
        assert all(layer.lora_r.weight.abs().sum() > 0 for layer in lora_layers(model).values())
    assert all(not k.startswith("_module.") for k in model.state_dict())


@pytest.mark.parametrize("mode", ["lora", "sb"])
def test_dp_run_at_epsilon_8_learns(mode):
    _learns_at_epsilon_8(mode, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["lora", "sb"])
def test_dp_on_cuda_with_bf16_autocast_learns(mode):
    _learns_at_epsilon_8(mode, "cuda")


# ---- guards -------------------------------------------------------------------------------------

def test_adapters_that_do_not_change_under_dp_are_an_error(monkeypatch):
    model, data = _adapted(), TASK.generate(100, seed=1)
    kw = dict(cfg=_cfg(noise_multiplier=1.0), state=PrivacyState(), batch_size=10, steps=2,
              planned_total_steps=2, optim=OptimConfig(), device="cpu", seed=0)
    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
        with pytest.raises(RuntimeError, match="no trainable parameter changed"):
            train_private(model, data, **kw)
    assert not hasattr(model, "autograd_grad_sample_hooks")  # cleaned up even on error
    before = _snapshot(model)
    train_private(model, data, **kw)  # the same model trains in the next session (no double wrap)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_double_wrapping_is_refused():
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleHooks

    model = _adapted()
    with pytest.raises(ValueError, match="already an Opacus GradSampleModule"):
        check_dp_compatible(GradSampleModule(model))
    model = _adapted()
    hooks = GradSampleHooks(model)
    with pytest.raises(ValueError, match="double wrap"):
        train_private(model, TASK.generate(50), cfg=_cfg(noise_multiplier=1.0),
                      state=PrivacyState(), batch_size=10, steps=1, planned_total_steps=1,
                      optim=OptimConfig(), device="cpu")
    hooks.cleanup()
    check_dp_compatible(model)


class _MHAClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(64, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask=None):
        x = self.tok(input_ids)
        return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))


def test_trainable_multihead_attention_gets_a_clear_error():
    model = _MHAClassifier()
    with pytest.raises(ValueError, match=r"(?s)mha \(MultiheadAttention\).*Fix: freeze it.*"
                                         r"q/k/v/o nn\.Linear.*ModuleValidator\.fix"):
        train_private(model, TASK.generate(20), cfg=_cfg(noise_multiplier=1.0),
                      state=PrivacyState(), batch_size=5, steps=1, planned_total_steps=1,
                      optim=OptimConfig(), device="cpu")
    model.tok.requires_grad_(False)
    model.mha.requires_grad_(False)  # frozen: Opacus ignores it
    res = train_private(model, TASK.generate(20), cfg=_cfg(noise_multiplier=1.0),
                        state=PrivacyState(), batch_size=5, steps=2, planned_total_steps=2,
                        optim=OptimConfig(), device="cpu", seed=0)
    assert res.train.steps == 2


def test_trainable_module_with_buffers_is_refused():
    model = _adapted()
    model.head.register_buffer("running", torch.zeros(2))
    with pytest.raises(ValueError, match=r"head \(Linear\).*buffers"):
        check_dp_compatible(model)


def test_tensor_dict_dataset_batches_and_rates():
    # q = batch_size / n exactly, recorded as is (Opacus' 1/len(loader) is 1/92 for 93 batches)
    data = TensorDictDataset(**{k: v for k, v in TASK.generate(93 * 2, seed=1).tensors.items()})
    res = train_private(_adapted(), data, cfg=_cfg(noise_multiplier=1.0), state=PrivacyState(),
                        batch_size=2, steps=1, planned_total_steps=1, optim=OptimConfig(),
                        device="cpu", seed=0)
    assert res.state.history == [(1.0, 2 / 186, 1)] and res.sample_rate == 2 / 186
    assert math.isfinite(res.epsilon) and res.metrics()["epsilon"] == res.epsilon


def test_config_from_a_flat_mapping():
    cfg = PrivacyConfig.from_dict({"enabled": True, "target-epsilon": 3.0, "max_grad_norm": 0.5,
                                   "accountant": "prv"})
    assert cfg == PrivacyConfig(enabled=True, target_epsilon=3.0, max_grad_norm=0.5,
                                accountant="prv")
    assert PrivacyConfig.from_dict({}) == PrivacyConfig()
    with pytest.raises(ValueError, match="unknown privacy setting 'epsilon'"):
        PrivacyConfig.from_dict({"epsilon": 3.0})


def test_shuffled_batches_without_poisson_sampling():
    res = train_private(_adapted(), TASK.generate(100, seed=1),
                        cfg=_cfg(noise_multiplier=1.0, poisson_sampling=False),
                        state=PrivacyState(), batch_size=10, steps=12, planned_total_steps=12,
                        optim=OptimConfig(), device="cpu", seed=0)
    assert res.train.steps == 12 and res.train.num_examples == 120
    assert res.state.history == [(1.0, 0.1, 12)]


def test_an_error_mid_round_leaves_the_model_as_it_was(monkeypatch):
    model = _adapted()
    before = _snapshot(model)
    calls = {"n": 0}
    step0 = DPOptimizer.step

    def step(self, closure=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return step0(self, closure)

    monkeypatch.setattr(DPOptimizer, "step", step)
    with pytest.raises(RuntimeError, match="boom"):
        train_private(model, TASK.generate(100, seed=1), cfg=_cfg(noise_multiplier=1.0),
                      state=PrivacyState(), batch_size=10, steps=5, planned_total_steps=5,
                      optim=OptimConfig(lr=1e-2), device="cpu", seed=0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_dp_accountant_survives_a_restarted_node(tmp_path):
    """A SuperNode that restarts loses Flower's context.state; the node cache keeps the history."""
    from flwr.app import Context, RecordDict

    from clients.app import _train_private
    from fedlora.config import load_config
    from fedlora.rundata import build_base, client_data, inject

    spec = load_config(None, ["privacy.enabled=true", "privacy.noise_multiplier=1.0",
                              "train.local_steps=2"]).client_spec()
    spec.run_uid = "abc"
    model = build_base(spec)
    inject(spec, model, 8)
    train, _ = client_data(spec, 0, 6)
    optim = OptimConfig("sgd", 0.05)

    def fresh_node():
        return Context(run_id=1, node_id=1, node_config={"cache-dir": str(tmp_path)}, state=RecordDict(),
                       run_config={})

    eps = []
    for _ in range(3):  # every call: a new process with an empty context.state
        _, metrics, state = _train_private(fresh_node(), spec, model, train, optim, torch.device("cpu"),
                                           0, None)
        eps.append(metrics["epsilon"])
    assert eps[0] < eps[1] < eps[2] and sum(state["steps"]) == 6
    # a different run (new run_uid) starts its own accountant
    spec.run_uid = "def"
    _, metrics, _ = _train_private(fresh_node(), spec, model, train, optim, torch.device("cpu"), 0, None)
    assert metrics["epsilon"] == pytest.approx(eps[0])
