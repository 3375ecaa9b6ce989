"""LoRALinear math, merge/unmerge, base-delta folding, injection rules."""

from __future__ import annotations

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


def _layer(rank: int, mode: str = "lora", scale: float = 1.7, dtype=torch.float64) -> LoRALinear:
    torch.manual_seed(rank)
    base = nn.Linear(K, D).to(dtype)
    layer = LoRALinear(base, rank, scale, mode=mode, seed=rank)
    with torch.no_grad():  # non-zero factors so the adapter matters
        layer.lora_b.weight.normal_()
        if mode == "sb":
            layer.lora_a.weight.normal_()
            layer.lora_r.weight.normal_()
    return layer


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_forward_matches_hand_formula_lora(rank):
    layer = _layer(rank)
    x = torch.randn(3, 4, K, dtype=torch.float64)
    W0, b = layer.base.weight, layer.base.bias
    A, B = layer.lora_a.weight, layer.lora_b.weight
    expected = x @ W0.T + b + layer.scale * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight(), layer.scale * B @ A, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_forward_matches_hand_formula_sb(rank):
    layer = _layer(rank, mode="sb")
    x = torch.randn(5, K, dtype=torch.float64)
    W0, b = layer.base.weight, layer.base.bias
    A, B, R = layer.lora_a.weight, layer.lora_b.weight, layer.lora_r.weight
    expected = x @ W0.T + b + layer.scale * (x @ A.T @ R.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight(), layer.scale * B @ R @ A, rtol=1e-12, atol=1e-12)
    # only R trains in LoRA-SB mode
    assert layer.lora_r.weight.requires_grad
    assert not layer.lora_a.weight.requires_grad and not layer.lora_b.weight.requires_grad


@pytest.mark.parametrize("mode", ["lora", "sb"])
def test_merge_unmerge_restores_and_matches_delta(mode):
    layer = _layer(4, mode)
    x = torch.randn(6, K, dtype=torch.float64)
    y = layer(x)
    w_before = layer.effective_weight().clone()
    delta = layer.delta_weight()
    layer.merge_()
    # after merging, the frozen path alone carries W0 + s·B·A and the output is unchanged
    torch.testing.assert_close(layer.base_delta, delta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.effective_weight(), w_before, rtol=1e-12, atol=1e-12)
    layer.unmerge_()
    torch.testing.assert_close(layer.base_delta, torch.zeros_like(delta), rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x), y, rtol=1e-10, atol=1e-10)
    assert torch.equal(layer.base.weight, layer.base.weight)  # W0 itself is never written


def test_fold_dense_and_factored_in_linear_orientation():
    layer = _layer(2)
    W0 = layer.base.weight.detach().clone()
    U, V = torch.randn(D, 3, dtype=torch.float64), torch.randn(3, K, dtype=torch.float64)
    dense = torch.randn(D, K, dtype=torch.float64)
    layer.fold_into_base_((U, V))
    layer.fold_into_base_(dense)
    torch.testing.assert_close(layer.base_delta, U @ V + dense)
    assert torch.equal(layer.base.weight, W0)
    x = torch.randn(4, K, dtype=torch.float64)
    expected = x @ (W0 + U @ V + dense).T + layer.base.bias + layer.scale * x @ layer.delta_weight().T / \
        layer.scale
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="orientation"):
        layer.fold_into_base_(torch.randn(K, D, dtype=torch.float64))  # transposed: rejected
    layer.set_base_delta_(None)
    assert layer.base_delta is None
    torch.testing.assert_close(layer.effective_weight(), W0 + layer.delta_weight())


def test_fold_into_bf16_base_keeps_fp32_master():
    base = nn.Linear(K, D).to(torch.bfloat16)
    layer = LoRALinear(base, 2, 1.0)
    tiny = torch.full((D, K), 1e-4)  # far below bf16 resolution near 1
    for _ in range(100):
        layer.fold_into_base_(tiny)
    assert layer.base_delta.dtype == torch.float32
    torch.testing.assert_close(layer.base_delta, torch.full((D, K), 1e-2), rtol=1e-4, atol=1e-6)
    assert base.weight.dtype == torch.bfloat16


def test_reset_rank_and_seeded_init_leading_slice():
    layer = _layer(4)
    layer.reset_(8, seed=3)
    assert layer.rank == 8 and torch.count_nonzero(layer.lora_b.weight) == 0
    torch.testing.assert_close(layer.lora_a.weight, kaiming_a(8, K, 3, torch.float64))
    torch.testing.assert_close(kaiming_a(8, K, 3)[:3], kaiming_a(3, K, 3))
    bound = 1 / K ** 0.5
    assert layer.lora_a.weight.abs().max() <= bound
    with pytest.raises(ValueError, match="rank"):
        layer.reset_(0)


def test_scale_rules():
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 4, rslora=True) == 8.0
    assert LoRAConfig(alpha=16, rank=8, scale=0.5).scale_for(4) == 0.5


def test_injection_freezes_all_but_adapters_and_head():
    model = get_model("tiny", seed=0)
    names = inject_lora(model, LoRAConfig(targets=["attn.q", "attn.v"], rank=4, trainable=["head"]))
    assert names == ["layers.0.attn.q", "layers.0.attn.v", "layers.1.attn.q", "layers.1.attn.v"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.lora_{f}.weight" for n in names for f in "ab"} | {"head.weight", "head.bias"}
    assert trainable == expected


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
    for n in state:
        torch.testing.assert_close(effective_weight(other, n), effective_weight(model, n))
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
