"""LoRALinear math, merge/unmerge, base-delta folding, injection rules.

Every expected value here is computed from plain float64 tensors with the formula of the module
docstring, ``y = x (W0 + D + s·B·A)ᵀ + b`` (``B·R·A`` in sb mode), never with the layer's own
methods: a layer that computes the wrong thing cannot agree with it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from fedlora.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_state,
    effective_weight,
    inject_lora,
    kaiming_a,
    load_adapter_state,
    lora_layers,
    lora_scale,
)
from fedlora.models import get_model

D, K = 7, 5  # non-square on purpose: a transposed delta cannot pass
S = 1.7  # the LoRA scale, a literal: expected values never read it back from the layer
TOL = {"rtol": 1e-12, "atol": 1e-12}
F64 = torch.float64


def _plain(rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Independent float64 tensors: W0, b, A, B, R, a dense base delta Dl, a factored one (U, V)."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64)

    return {"W0": r(D, K), "b": r(D), "A": r(rank, K), "B": r(D, rank), "R": r(rank, rank),
            "Dl": r(D, K), "U": r(D, 3), "V": r(3, K)}


def _layer(t: dict[str, torch.Tensor], mode: str = "lora", scale: float = S, dropout: float = 0.0,
           dtype: torch.dtype = F64) -> LoRALinear:
    """A LoRALinear over ``nn.Linear(W0, b)`` with the factors of ``t`` loaded (public API only)."""
    base = nn.Linear(K, D, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(t["W0"])
        base.bias.copy_(t["b"])
    layer = LoRALinear(base, t["A"].shape[0], scale, dropout=dropout, mode=mode)
    layer.set_factors_(A=t["A"], B=t["B"], R=t["R"] if mode == "sb" else None)
    return layer


def _adapter(t: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    return t["B"] @ t["R"] @ t["A"] if mode == "sb" else t["B"] @ t["A"]


def _linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x @ W.T + b


@pytest.mark.parametrize("mode, rank", [("lora", 1), ("lora", 2), ("lora", 8), ("sb", 1), ("sb", 3)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_forward_matches_direct_formula(mode, rank, with_delta):
    t = _plain(rank, seed=rank)
    layer = _layer(t, mode)
    W = t["W0"] + S * _adapter(t, mode)
    if with_delta:
        layer.fold_into_base_(t["Dl"])
        W = W + t["Dl"]
    x = torch.randn(3, 4, K, dtype=F64)  # leading batch dims pass through
    torch.testing.assert_close(layer(x), _linear(x, W, t["b"]), **TOL)
    torch.testing.assert_close(layer.delta_weight(), S * _adapter(t, mode), **TOL)
    torch.testing.assert_close(layer.effective_weight(), W, **TOL)


@pytest.mark.parametrize("mode", ["lora", "sb"])
def test_gradients_reach_exactly_the_trainable_factors(mode):
    """Autograd through the layer equals autograd through the direct formula; W0, b (and, in sb
    mode, B and A) get no gradient."""
    t = _plain(3, seed=11)
    layer = _layer(t, mode)
    x = torch.randn(6, K, dtype=F64)
    w_out = torch.randn(D, dtype=F64)
    (layer(x) @ w_out).sum().backward()

    ref = {k: t[k].clone().requires_grad_(True) for k in ("A", "B", "R")}
    W = t["W0"] + S * _adapter(ref, mode)
    (_linear(x, W, t["b"]) @ w_out).sum().backward()

    trained = {"lora": ("A", "B"), "sb": ("R",)}[mode]
    params = {"A": layer.lora_a.weight, "B": layer.lora_b.weight,
              "R": layer.lora_r.weight if mode == "sb" else None}
    for k, p in params.items():
        if k in trained:
            torch.testing.assert_close(p.grad, ref[k].grad, **TOL)
        elif p is not None:
            assert p.grad is None, k
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


@pytest.mark.parametrize("mode", ["lora", "sb"])
def test_merge_unmerge_exact(mode):
    t = _plain(4, seed=2)
    layer = _layer(t, mode)
    x = torch.randn(6, K, dtype=F64)
    y0 = layer(x)
    expected = _linear(x, t["W0"] + S * _adapter(t, mode), t["b"])

    layer.merge_()
    layer.merge_()  # idempotent: the adapter is not folded twice
    assert layer.merged
    torch.testing.assert_close(layer(x), expected, **TOL)
    torch.testing.assert_close(layer.effective_weight(), t["W0"] + S * _adapter(t, mode), **TOL)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.reset_(2)  # a merged layer cannot drop its adapter silently

    layer.unmerge_()
    layer.unmerge_()  # idempotent as well
    assert not layer.merged
    # from W0 alone, merge + unmerge is bit-exact: D = s·B·A − s·B·A = 0
    assert torch.equal(layer(x), y0)
    torch.testing.assert_close(layer.effective_weight(), t["W0"] + S * _adapter(t, mode), **TOL)
    assert torch.equal(layer.base.weight, t["W0"])  # W0 itself is never written


def test_merge_unmerge_on_a_folded_base():
    t = _plain(2, seed=5)
    layer = _layer(t)
    layer.fold_into_base_(t["Dl"])
    x = torch.randn(4, K, dtype=F64)
    expected = _linear(x, t["W0"] + t["Dl"] + S * _adapter(t, "lora"), t["b"])
    layer.merge_()
    torch.testing.assert_close(layer(x), expected, **TOL)
    layer.unmerge_()
    torch.testing.assert_close(layer(x), expected, **TOL)
    assert torch.equal(layer.base.weight, t["W0"])


def test_merged_layer_output_ignores_dropout():
    """Merged, the adapter lives in the frozen path: no dropout on it, even in train mode."""
    t = _plain(2, seed=6)
    layer = _layer(t, dropout=0.9)
    layer.train()
    x = torch.randn(64, K, dtype=F64)
    expected = _linear(x, t["W0"] + S * _adapter(t, "lora"), t["b"])
    assert not torch.allclose(layer(x), expected)  # unmerged in train mode: dropout on the adapter
    layer.merge_()
    torch.testing.assert_close(layer(x), expected, **TOL)


def test_fold_factored_equals_dense_product_and_accumulates():
    t = _plain(2, seed=3)
    factored, dense = _layer(t), _layer(t)
    factored.fold_into_base_((t["U"], t["V"]))
    dense.fold_into_base_(t["U"] @ t["V"])  # the product, computed here in float64
    x = torch.randn(4, K, dtype=F64)
    adapter = S * _adapter(t, "lora")
    expected = _linear(x, t["W0"] + t["U"] @ t["V"] + adapter, t["b"])
    torch.testing.assert_close(factored(x), expected, **TOL)
    torch.testing.assert_close(dense(x), expected, **TOL)

    factored.fold_into_base_(t["Dl"])  # folds add up
    expected = _linear(x, t["W0"] + t["U"] @ t["V"] + t["Dl"] + adapter, t["b"])
    torch.testing.assert_close(factored(x), expected, **TOL)
    torch.testing.assert_close(factored.effective_weight(), t["W0"] + t["U"] @ t["V"] + t["Dl"] + adapter,
                               **TOL)
    assert torch.equal(factored.base.weight, t["W0"])

    factored.set_base_delta_(t["Dl"])  # set replaces
    torch.testing.assert_close(factored(x), _linear(x, t["W0"] + t["Dl"] + adapter, t["b"]), **TOL)
    factored.set_base_delta_(None)  # back to W0
    torch.testing.assert_close(factored(x), _linear(x, t["W0"] + adapter, t["b"]), **TOL)
    factored.set_base_delta_((t["U"], t["V"]))
    torch.testing.assert_close(factored(x), _linear(x, t["W0"] + t["U"] @ t["V"] + adapter, t["b"]),
                               **TOL)


def test_fold_rejects_transposed_deltas():
    t = _plain(2, seed=4)
    layer = _layer(t)
    x = torch.randn(3, K, dtype=F64)
    y = layer(x)
    with pytest.raises(ValueError, match="orientation"):
        layer.fold_into_base_(t["Dl"].T.contiguous())
    with pytest.raises(ValueError, match="orientation"):
        layer.fold_into_base_((t["V"].T, t["U"].T))  # U@V transposed, as factors
    with pytest.raises(ValueError, match="orientation"):
        layer.set_base_delta_(t["Dl"].T.contiguous())
    assert torch.equal(layer(x), y)  # a rejected delta leaves the layer as it was


def test_sb_delta_is_scaled_core_between_frozen_factors():
    """A Fed-SB core M (r×r, or r_max×r_max with tails) folds in as s·[B|B_t]·M·[A; A_t]."""
    t = _plain(2, seed=8)
    layer = _layer(t, "sb")
    x = torch.randn(5, K, dtype=F64)
    M = torch.randn(2, 2, dtype=F64)
    layer.fold_into_base_(layer.sb_delta(M))
    expected = _linear(x, t["W0"] + S * t["B"] @ M @ t["A"] + S * _adapter(t, "sb"), t["b"])
    torch.testing.assert_close(layer(x), expected, **TOL)

    # below r_max: the core covers the held tail components too
    B_tail, A_tail = torch.randn(D, 2, dtype=F64), torch.randn(2, K, dtype=F64)
    layer.sb_tail = (B_tail, A_tail)
    M4 = torch.randn(4, 4, dtype=F64)
    U, V = layer.sb_delta(M4)
    B_full, A_full = torch.cat([t["B"], B_tail], 1), torch.cat([t["A"], A_tail], 0)
    torch.testing.assert_close(U @ V, S * B_full @ M4 @ A_full, **TOL)
    with pytest.raises(ValueError, match="does not fit"):
        layer.sb_delta(torch.randn(3, 3, dtype=F64))


def test_fold_into_bf16_base_keeps_full_precision():
    """A hundred deltas each far below bf16 resolution add up (D is not held in the base dtype),
    and the forward pass sees their sum; the bf16 W0 is not written."""
    torch.manual_seed(0)
    base = nn.Linear(K, D).to(torch.bfloat16)
    W0 = base.weight.detach().clone()
    layer = LoRALinear(base, 2, 1.0)  # B = 0: the adapter adds nothing
    x = torch.ones(1, K, dtype=torch.bfloat16)
    y0 = layer(x).double()
    for _ in range(100):
        layer.fold_into_base_(torch.full((D, K), 1e-4))
    # a bf16 (or per-step-rounded) accumulator would be off by far more than 1e-6
    torch.testing.assert_close(layer.effective_weight().double() - W0.double(),
                               torch.full((D, K), 1e-2, dtype=F64), rtol=0, atol=1e-6)
    # each output gains Σ_k 0.01·x_k = 0.05, against bf16 output resolution ~0.008
    shift = layer(x).double() - y0
    torch.testing.assert_close(shift, torch.full_like(shift, 0.05), rtol=0, atol=0.02)
    assert torch.equal(base.weight, W0)
    assert layer(x).dtype == torch.bfloat16


def test_reset_gives_fresh_adapter_at_new_rank():
    t = _plain(4, seed=9)
    layer = _layer(t)
    layer.fold_into_base_(t["Dl"])
    layer.reset_(8, seed=3)
    f = layer.factors()
    assert f["A"].shape == (8, K) and f["B"].shape == (D, 8)
    x = torch.randn(5, K, dtype=F64)
    # B = 0: the adapter contributes nothing, the folded base delta stays
    torch.testing.assert_close(layer(x), _linear(x, t["W0"] + t["Dl"], t["b"]), **TOL)
    with pytest.raises(ValueError, match="rank"):
        layer.reset_(0)
    # the seeded A is what the server's kaiming_a draws (clients regenerate A from the seed)
    assert torch.equal(f["A"], kaiming_a(8, K, 3, F64))
    other = _layer(_plain(2, seed=10))
    other.reset_(8, seed=3)
    assert torch.equal(other.factors()["A"], f["A"])
    other.reset_(8, seed=4)
    assert not torch.equal(other.factors()["A"], f["A"])


def test_kaiming_a_distribution_and_leading_slice():
    """Kaiming-uniform(a=√5) on an r×k weight, as nn.Linear / PEFT draw it: U(−bound, bound) with
    bound = √3·gain/√k from torch's own gain; seeded draws are reproducible and nested."""
    k = 50
    bound = math.sqrt(3) * nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(k)
    a = kaiming_a(400, k, seed=1, dtype=F64)
    assert a.shape == (400, k) and a.dtype == F64
    assert a.abs().max() <= bound
    assert a.abs().max() >= 0.99 * bound  # 20 000 draws fill the interval
    assert abs(a.mean().item()) < 0.02 * bound
    assert a.var().item() == pytest.approx(bound ** 2 / 3, rel=0.03)  # variance of U(−c, c): c²/3
    assert torch.equal(kaiming_a(400, k, seed=1, dtype=F64), a)
    assert not torch.equal(kaiming_a(400, k, seed=2, dtype=F64), a)
    torch.testing.assert_close(kaiming_a(8, K, 3)[:3], kaiming_a(3, K, 3), rtol=0, atol=0)
    assert kaiming_a(3, K, 3).dtype == torch.float32


def test_scale_rules():
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 4, rslora=True) == 8.0
    assert LoRAConfig(alpha=16, rank=8).scale_for(4) == 4.0
    assert LoRAConfig(alpha=16, rslora=True).scale_for(16) == 4.0
    assert LoRAConfig(alpha=16, rank=8, scale=0.5).scale_for(4) == 0.5
    with pytest.raises(ValueError, match="rank"):
        lora_scale(16, 0)


def test_injection_freezes_all_but_adapters_and_head():
    model = get_model("tiny", seed=0)
    names = inject_lora(model, LoRAConfig(targets=["attn.q", "attn.v"], rank=4, trainable=["head"]))
    assert names == ["layers.0.attn.q", "layers.0.attn.v", "layers.1.attn.q", "layers.1.attn.v"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.lora_{f}.weight" for n in names for f in "ab"} | {"head.weight", "head.bias"}
    assert trainable == expected


def test_injected_model_computes_the_plain_model_until_b_moves():
    """Injection (B = 0) leaves the model's function unchanged; a loaded B changes exactly the
    targeted weight by s·B·A."""
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 10, dtype=torch.long)
    plain = get_model("tiny", seed=0).eval()
    model = get_model("tiny", seed=0).eval()
    inject_lora(model, LoRAConfig(targets=["attn.q", "attn.v"], rank=4, scale=2.0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), plain(ids, mask), rtol=0, atol=0)
    name = "layers.1.attn.v"
    A = adapter_state(model)[name]["A"]
    B = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    load_adapter_state(model, {name: {"B": B}})
    target = plain.get_submodule(name)
    W = target.weight.detach().double() + 2.0 * B.double() @ A.double()
    torch.testing.assert_close(effective_weight(model, name).double(), W, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        target.weight.copy_(W.float())  # the plain model with that weight computes the same
        torch.testing.assert_close(model(ids, mask), plain(ids, mask), rtol=1e-5, atol=1e-5)


def test_injection_per_module_rank_and_state_roundtrip():
    model = get_model("tiny", seed=0)
    inject_lora(model, LoRAConfig(targets=["attn.q", "attn.v"], rank=4, ranks={"layers.1.*": 2},
                                  scale=2.0))  # one scale per run, whatever the rank
    ranks = {n: m.rank for n, m in lora_layers(model).items()}
    assert ranks == {"layers.0.attn.q": 4, "layers.0.attn.v": 4, "layers.1.attn.q": 2, "layers.1.attn.v": 2}
    state = adapter_state(model)
    state["layers.0.attn.q"]["B"] = torch.randn(32, 4)
    load_adapter_state(model, state)
    other = get_model("tiny", seed=0)
    inject_lora(other, LoRAConfig(targets=["attn.q", "attn.v"], rank=8, scale=2.0))
    load_adapter_state(other, state)  # resizes to the loaded rank
    assert {n: m.rank for n, m in lora_layers(other).items()} == ranks
    for n, f in adapter_state(other).items():
        for k in ("A", "B"):
            assert torch.equal(f[k], state[n][k]), (n, k)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(ids, mask), model.eval()(ids, mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown layers"):
        load_adapter_state(other, {"nope": {}})


@pytest.mark.parametrize(
    "config, match",
    [
        (LoRAConfig(targets=["does_not_exist"]), "matches no module"),
        (LoRAConfig(targets=["attn"]), "only nn.Linear"),
        (LoRAConfig(targets=["ln1"]), "only nn.Linear"),
        (LoRAConfig(targets=["attn.q"], rank=0), "rank must be an integer >= 1"),
        (LoRAConfig(targets=["attn.q"], ranks={"attn.q": -1}), "rank must be"),
        (LoRAConfig(targets=[]), "targets is empty"),
        (LoRAConfig(targets=["attn.q"], trainable=["nohead"]), "trainable module"),
    ],
)
def test_injection_errors_are_clear(config, match):
    with pytest.raises(ValueError, match=match):
        inject_lora(get_model("tiny", seed=0), config)
