"""The five rules of issue #15 against their papers' formulas (float64, mixed ranks, direct math).

FFA-LoRA, RoLoRA and FedSVD are also in the Sync/Exact contracts (``test_strategies_contracts``);
here: what each trains and uploads, the averages against the direct formula, FedSVD's
re-factorisation, FlexLoRA's truncations (Eckart–Young), HetLoRA's weights, zero padding and local
rank self-pruning, and DP with only B trained.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from strategy_helpers import (
    SHAPES,
    Multi,
    apply_payload,
    effective,
    layer_specs,
    make_update,
    state_tensors,
    train_randomly,
    w0,
)

from fedlora.client import RankSelfPruning
from fedlora.lora import LoRALinear, kaiming_a, lora_layers
from fedlora.strategies import ClientPayload, ClientUpdate, LayerSpec, LowRank, create_strategy
from fedlora.strategies.fedsvd import svd_of_product
from fedlora.strategies.hetlora import prune_target
from fedlora.train import OptimConfig, train_local

F64 = torch.float64
S = 1.5


def _strategy(name, r_max=4, **kw):
    return create_strategy(name, layers=layer_specs(), r_max=r_max, scale=S, dtype=F64, seed=2, **kw)


def _round(s, ranks, n_ex, gen, clients=None, ids=None):
    """One round of ``ranks``' clients (persistent models in ``clients``): (updates, their W_i)."""
    ids = ids if ids is not None else list(range(len(ranks)))
    clients = clients if clients is not None else {}
    ups, W = [], []
    for i in ids:
        m = clients.setdefault(i, Multi(0, ranks[i], S, "lora"))
        p = s.payload(f"c{i}", ranks[i], getattr(m, "held", 0))
        apply_payload(m, p)
        m.held = p.base_version
        train_randomly(m, gen)
        ups.append(make_update(m, p, n_ex[i]))
        W.append(effective(m))
    return ups, W


def _weights(n_ex, ids):
    tot = sum(n_ex[i] for i in ids)
    return [n_ex[i] / tot for i in ids]


# ---- FFA-LoRA -----------------------------------------------------------------------------------

def test_ffa_a_is_the_seeded_draw_frozen_and_only_b_travels_up():
    s = _strategy("ffa")
    A0 = {n: kaiming_a(4, k, 2 * 100_003 + i, F64) for i, (n, (_, k)) in enumerate(SHAPES.items())}
    gen = torch.Generator().manual_seed(0)
    clients, n_ex = {}, [3, 9, 4]
    for _ in range(3):
        ups, _ = _round(s, [1, 4, 2], n_ex, gen, clients)
        assert all(set(f) == {"B"} for u in ups for f in u.factors.values())
        rep = s.aggregate(ups)
        for i, r in enumerate([1, 4, 2]):  # half of LoRA's upload: d·r numbers per layer
            assert rep.bytes_up[f"c{i}"] == sum(d * r * 8 for d, _ in SHAPES.values())
        for n in SHAPES:
            assert torch.equal(s.A[n], A0[n])  # never moves
        for m in clients.values():
            for n, layer in lora_layers(m).items():
                assert not layer.lora_a.weight.requires_grad and layer.lora_b.weight.requires_grad
                assert torch.equal(layer.lora_a.weight, A0[n][:layer.rank])  # drawn from its seed
    p = s.payload("c0", 2, s.version)  # A travels as its seed, never as numbers
    assert all(set(f) == {"B"} for f in p.factors.values())
    assert p.a_seeds == {n: 2 * 100_003 + i for i, n in enumerate(SHAPES)}


def test_ffa_average_is_the_completed_b_mean_and_tails_travel_only_when_they_moved():
    s = _strategy("ffa")
    gen = torch.Generator().manual_seed(1)
    ranks, n_ex, clients = [1, 3, 2, 4], [5, 2, 7, 3], {}
    s.aggregate(_round(s, ranks, n_ex, gen, clients)[0])
    B_old = {n: s.B[n].clone() for n in SHAPES}
    ids = [0, 2, 3]
    ups, _ = _round(s, ranks, n_ex, gen, clients, ids=ids)
    s.aggregate(ups)
    p = _weights(n_ex, ids)
    for n in SHAPES:
        want = sum(pi * torch.cat([u.factors[n]["B"], B_old[n][:, u.rank:]], 1) for u, pi in zip(ups, p))
        torch.testing.assert_close(s.B[n], want, rtol=1e-12, atol=1e-12)
    stale = s.payload("c1", 3, 1)  # rank 3 at an old version: its tail as a factored reset
    (bd,) = stale.base_deltas
    assert bd.reset and bd.version == s.version
    for n in SHAPES:
        t = bd.layers[n]
        assert isinstance(t, LowRank)
        torch.testing.assert_close(t.U @ t.V, S * s.B[n][:, 3:] @ s.A[n][3:])
    # bytes down: B's slice d·r and A's seed (8 bytes), plus the tail (r_max − r)(d+k) when it moved
    seeds = 8 * len(SHAPES)
    assert stale.bytes_down == sum((3 * d + 1 * (d + k)) * 8 for d, k in SHAPES.values()) + seeds
    fresh = s.payload("c1", 3, s.version)
    assert fresh.base_deltas == [] and fresh.bytes_down == sum(3 * d * 8 for d, _ in SHAPES.values()) + seeds
    assert s.payload("c3", 4, 1).base_deltas == []  # r_max: no tail at any version


# ---- RoLoRA -------------------------------------------------------------------------------------

def test_rolora_alternates_b_then_a_and_averages_the_trained_factor():
    s = _strategy("rolora")
    gen = torch.Generator().manual_seed(2)
    ranks, n_ex = [2, 4, 1], [4, 6, 5]
    clients = {}
    for t in range(4):
        key = "B" if t % 2 == 0 else "A"
        A_old, B_old = ({n: x[n].clone() for n in SHAPES} for x in (s.A, s.B))
        ups, W = _round(s, ranks, n_ex, gen, clients)
        assert all(set(f) == {key} for u in ups for f in u.factors.values())
        for m in clients.values():
            for layer in lora_layers(m).values():
                assert layer.lora_b.weight.requires_grad == (key == "B")
                assert layer.lora_a.weight.requires_grad == (key == "A")
        s.aggregate(ups)
        p = _weights(n_ex, range(3))
        for n in SHAPES:
            if key == "B":
                want = sum(pi * torch.cat([u.factors[n]["B"], B_old[n][:, u.rank:]], 1)
                           for u, pi in zip(ups, p))
                torch.testing.assert_close(s.B[n], want, rtol=1e-12, atol=1e-12)
                assert torch.equal(s.A[n], A_old[n])
            else:
                want = sum(pi * torch.cat([u.factors[n]["A"], A_old[n][u.rank:]], 0)
                           for u, pi in zip(ups, p))
                torch.testing.assert_close(s.A[n], want, rtol=1e-12, atol=1e-12)
                assert torch.equal(s.B[n], B_old[n])
            target = sum(pi * Wi[n] for pi, Wi in zip(p, W))
            torch.testing.assert_close(w0(clients[0])[n] + s.global_delta(n), target, rtol=1e-10, atol=1e-10)


def test_rolora_rejects_the_other_factor_and_a_rejected_round_does_not_flip_the_alternation():
    s = _strategy("rolora")
    gen = torch.Generator().manual_seed(3)
    (u,), _ = _round(s, [2], [5], gen)
    wrong = copy.deepcopy(u)
    wrong.factors = {n: {"A": torch.zeros(2, k, dtype=F64)} for n, (_, k) in SHAPES.items()}
    rep = s.aggregate([wrong])
    assert rep.accepted == [] and "carry exactly ['B']" in rep.rejected["c0"]
    assert s.round_trains() == {"B"}  # nothing aggregated: still a B round
    assert s.aggregate([u]).accepted == ["c0"]
    p = s.payload("c0", 2, s.version)
    assert p.trains == ("A",) and p.uploads == ("A",) and s.round_trains() == {"A"}


# ---- FedSVD -------------------------------------------------------------------------------------

@pytest.mark.parametrize("d, k, rho", [(30, 20, 3), (9, 7, 7), (6, 9, 12)])  # QR path, dense, ρ > min
def test_svd_of_a_product_equals_the_dense_svd(d, k, rho):
    g = torch.Generator().manual_seed(d)
    U, V = torch.randn(d, rho, generator=g, dtype=F64), torch.randn(rho, k, generator=g, dtype=F64)
    P, Sv, Qh = svd_of_product(U, V)
    torch.testing.assert_close(P * Sv @ Qh, U @ V, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(Sv, torch.linalg.svdvals(U @ V)[:Sv.numel()], rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(Qh @ Qh.T, torch.eye(Sv.numel(), dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(P.T @ P, torch.eye(Sv.numel(), dtype=F64), rtol=0, atol=1e-12)


def test_fedsvd_refactorises_with_orthonormal_a_and_leaves_the_product_unchanged():
    s = _strategy("fedsvd")
    gen = torch.Generator().manual_seed(4)
    ranks, n_ex = [4, 2, 3, 1], [3, 8, 2, 6]
    clients = {}
    for t in range(3):
        A_old, B_old = ({n: x[n].clone() for n in SHAPES} for x in (s.A, s.B))
        ids = [0, 1, 3] if t == 1 else [0, 1, 2, 3]
        ups, W = _round(s, ranks, n_ex, gen, clients, ids=ids)
        assert all(set(f) == {"B"} for u in ups for f in u.factors.values())
        s.aggregate(ups)
        p = _weights(n_ex, ids)
        for n in SHAPES:
            B_bar = sum(pi * torch.cat([u.factors[n]["B"], B_old[n][:, u.rank:]], 1) for u, pi in zip(ups, p))
            prod = B_bar @ A_old[n]
            torch.testing.assert_close(s.B[n] @ s.A[n], prod, rtol=1e-11, atol=1e-11)  # unchanged
            torch.testing.assert_close(s.A[n] @ s.A[n].T, torch.eye(4, dtype=F64), rtol=0, atol=1e-12)
            sv = torch.linalg.svdvals(prod)[:4]  # B = UΣ: orthogonal columns of norms σ_1 ≥ … ≥ σ_4
            torch.testing.assert_close(s.B[n].T @ s.B[n], torch.diag(sv ** 2), rtol=1e-10, atol=1e-10)
            target = sum(pi * Wi[n] for pi, Wi in zip(p, W))
            torch.testing.assert_close(w0(clients[0])[n] + s.global_delta(n), target, rtol=1e-10, atol=1e-10)


def test_fedsvd_needs_r_max_orthonormal_rows():
    with pytest.raises(ValueError, match="orthonormal"):
        create_strategy("fedsvd", layers={"w": LayerSpec(8, 3)}, r_max=4, scale=1.0)


# ---- FlexLoRA -----------------------------------------------------------------------------------

def test_flexlora_averages_the_full_updates_and_hands_out_best_rank_r_approximations():
    s = _strategy("flexlora")
    gen = torch.Generator().manual_seed(5)
    ranks, n_ex = [1, 4, 2, 3, 4], [4, 9, 2, 5, 3]
    first = s.payload("c9", 3, 0)
    for i, (n, (_, k)) in enumerate(SHAPES.items()):  # before any round: plain LoRA's start
        assert torch.count_nonzero(first.factors[n]["B"]) == 0
        torch.testing.assert_close(first.factors[n]["A"], kaiming_a(3, k, 2 * 100_003 + i, F64))
    clients = {}
    for ids in ([0, 1, 2, 3, 4], [1, 3], [0, 2, 4]):
        old = {n: s.global_delta(n) for n in SHAPES}
        ups, W = _round(s, ranks, n_ex, gen, clients, ids=ids)
        rep = s.aggregate(ups)
        p = _weights(n_ex, ids)
        num = den = 0.0
        for n in SHAPES:
            dW = sum(pi * S * u.factors[n]["B"] @ u.factors[n]["A"] for u, pi in zip(ups, p))
            torch.testing.assert_close(s.global_delta(n), dW, rtol=1e-12, atol=1e-12)  # ΔW = Σ p_i s B_i A_i
            target = sum(pi * Wi[n] for pi, Wi in zip(p, W))  # the global model is exact
            got = w0(clients[ids[0]])[n] + s.global_delta(n)
            torch.testing.assert_close(got, target, rtol=1e-10, atol=1e-10)
            U, sv, Vh = torch.linalg.svd(dW)
            for r in range(1, 5):
                f = s.payload("x", r, s.version).factors[n]
                approx = S * f["B"] @ f["A"]
                best = U[:, :r] * sv[:r] @ Vh[:r]
                torch.testing.assert_close(approx, best, rtol=1e-10, atol=1e-10)
                # Eckart–Young: the error of the payload is exactly the tail singular values
                assert float((dW - approx).norm() ** 2) == pytest.approx(float(sv[r:].pow(2).sum()), rel=1e-9,
                                                                        abs=1e-20)
                torch.testing.assert_close(f["A"] @ f["A"].T, torch.eye(r, dtype=F64), rtol=0, atol=1e-12)
            num += sum(pi * float(sv[u.rank:].pow(2).sum()) for u, pi in zip(ups, p))
            den += float((dW - old[n]).pow(2).sum())
        # the reported error: the round's clients' truncation gap, relative to the round's change
        assert rep.aggregation_error == pytest.approx(math.sqrt(num / den), rel=1e-9)
        assert rep.aggregation_error > 1e-3
        assert not s.exact


def test_flexlora_error_is_zero_when_every_rank_covers_the_update():
    s = _strategy("flexlora")
    gen = torch.Generator().manual_seed(6)
    ups, _ = _round(s, [2], [5], gen)  # one client of rank 2: ΔW has rank 2
    assert s.aggregate(ups).aggregation_error < 1e-12
    ups, _ = _round(s, [3, 1], [5, 5], gen, ids=[1])  # the next one holds its truncation at rank 1
    rep = s.aggregate(ups)
    assert rep.aggregation_error < 1e-12  # (a rank-1 ΔW): nothing is truncated


# ---- HetLoRA ------------------------------------------------------------------------------------

def _het_update(cid, r, n, g, scale_b=1.0):
    return ClientUpdate(cid, r, n, 0, {ln: {"A": torch.randn(r, k, generator=g, dtype=F64),
                                            "B": scale_b * torch.randn(d, r, generator=g, dtype=F64)}
                                       for ln, (d, k) in SHAPES.items()})


@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_hetlora_sparsity_weights_and_zero_padding_follow_the_paper(weighting):
    s = _strategy("hetlora", r_max=5, weighting=weighting)
    g = torch.Generator().manual_seed(7)
    A_old, B_old = ({n: x[n].clone() for n in SHAPES} for x in (s.A, s.B))
    ups = [_het_update("a", 1, 10, g), _het_update("b", 3, 30, g, 3.0), _het_update("c", 2, 20, g, 0.1)]
    for u in ups:
        s.payload(u.client_id, u.rank, 0)
    rep = s.aggregate(ups)
    # S_i = ‖ΔW_i‖_F over the whole model (dense, directly); w_i ∝ p_i·S_i (uniform p: the paper's)
    S_i = [math.sqrt(sum(float((f["B"] @ f["A"]).pow(2).sum()) for f in u.factors.values())) for u in ups]
    base = [1.0] * 3 if weighting == "uniform" else [10, 30, 20]
    w = [b * x / sum(b * x for b, x in zip(base, S_i)) for b, x in zip(base, S_i)]
    assert [rep.weights[u.client_id] for u in ups] == pytest.approx(w, rel=1e-12)
    for n, (d, k) in SHAPES.items():
        pad_B = [torch.cat([u.factors[n]["B"], torch.zeros(d, 5 - u.rank, dtype=F64)], 1) for u in ups]
        pad_A = [torch.cat([u.factors[n]["A"], torch.zeros(5 - u.rank, k, dtype=F64)], 0) for u in ups]
        want_B, want_A = sum(wi * x for wi, x in zip(w, pad_B)), sum(wi * x for wi, x in zip(w, pad_A))
        # zero padding: component 1 holds only b's and c's share (not renormalised); nobody holds
        # components 3 and 4, which keep their global value
        torch.testing.assert_close(s.B[n][:, :3], want_B[:, :3], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.A[n][:3], want_A[:3], rtol=1e-12, atol=1e-12)
        assert torch.equal(s.B[n][:, 3:], B_old[n][:, 3:]) and torch.equal(s.A[n][3:], A_old[n][3:])


def test_hetlora_weight_cap_holds_against_an_inflated_update():
    s = _strategy("hetlora", weighting="uniform", max_weight_share=0.5)
    g = torch.Generator().manual_seed(8)
    ups = [_het_update("a", 2, 5, g, 1e3), _het_update("b", 2, 5, g), _het_update("c", 2, 5, g)]
    rep = s.aggregate(ups)
    assert rep.weights["a"] == pytest.approx(0.5) and sum(rep.weights.values()) == pytest.approx(1.0)


def test_hetlora_pruning_targets():
    assert [prune_target(r, 0.5) for r in (8, 5, 2, 1)] == [4, 2, 1, 0]
    assert [prune_target(r, 0.9) for r in (10, 8, 2, 1)] == [9, 7, 1, 0]
    assert prune_target(100, 0.29) == 29  # not 28 from 0.29·100 = 28.999…


def _payload_for(model, rank, keep, lam, trains=("A", "B")):
    factors = {n: {"A": m.lora_a.weight.detach().clone(), "B": m.lora_b.weight.detach().clone()}
               for n, m in lora_layers(model).items()}
    return ClientPayload("c", rank, factors, [], 0, trains=trains, prune_to=keep, tail_penalty=lam)


def _tail_penalty(model, keep, lam):
    return lam * sum(m.lora_b.weight[:, keep:].norm() * m.lora_a.weight[keep:].norm()
                     for m in lora_layers(model).values())


def test_rank_self_pruning_penalty_step_is_the_gradient_of_the_tail_norm_product():
    g = torch.Generator().manual_seed(9)
    m = Multi(0, 4, S, "lora")
    for layer in lora_layers(m).values():
        with torch.no_grad():
            layer.lora_b.weight.copy_(torch.randn(layer.lora_b.weight.shape, generator=g, dtype=F64))
    p = _payload_for(m, 4, 2, 0.3)
    rule = RankSelfPruning.from_payload(m, p)
    before = {n: (x.lora_a.weight.detach().clone(), x.lora_b.weight.detach().clone())
              for n, x in lora_layers(m).items()}
    pen = _tail_penalty(m, 2, 0.3)
    pen.backward()
    opt = torch.optim.SGD([x for layer in lora_layers(m).values() for x in layer.parameters()], lr=0.05)
    rule.before_step(opt)
    for n, x in lora_layers(m).items():
        A0, B0 = before[n]
        torch.testing.assert_close(x.lora_a.weight, A0 - 0.05 * x.lora_a.weight.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.lora_b.weight, B0 - 0.05 * x.lora_b.weight.grad, rtol=1e-12, atol=1e-12)
        assert torch.equal(x.lora_a.weight[:2], A0[:2])  # the kept components carry no penalty


def test_sgd_with_the_decoupled_penalty_equals_sgd_on_the_penalised_loss():
    def model():
        torch.manual_seed(0)
        m = nn.Sequential(LoRALinear(nn.Linear(5, 6, dtype=F64), 4, S))
        with torch.no_grad():
            m[0].lora_b.weight.normal_()
        return m

    x = torch.randn(16, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(16, 6, dtype=F64, generator=torch.Generator().manual_seed(2))

    class Loader:
        def __iter__(self):
            yield {"input_ids": x, "labels": y}

    import fedlora.train as tr

    ref = model()
    opt = torch.optim.SGD([q for q in ref.parameters() if q.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (((ref(x) - y) ** 2).mean() + _tail_penalty(ref, 1, 0.7)).backward()
        opt.step()
    m = model()
    rule = RankSelfPruning.from_payload(m, _payload_for(m, 4, 1, 0.7))
    orig = tr._forward
    tr._forward = lambda mod, b, dev: (((mod(b["input_ids"]) - b["labels"]) ** 2).mean(), 16)
    try:
        train_local(m, Loader(), steps=3, optim=OptimConfig("sgd", lr=0.1), device="cpu",
                    before_step=rule.before_step)
    finally:
        tr._forward = orig
    for a, b in zip(ref.parameters(), m.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shrink", [True, False])
def test_rank_self_pruning_drops_the_tail_only_when_it_shrank(shrink):
    g = torch.Generator().manual_seed(10)
    m = Multi(0, 4, S, "lora")
    for layer in lora_layers(m).values():
        with torch.no_grad():
            layer.lora_b.weight.copy_(torch.randn(layer.lora_b.weight.shape, generator=g, dtype=F64))
    rule = RankSelfPruning.from_payload(m, _payload_for(m, 4, 3, 0.0))
    kept = {n: (x.lora_a.weight[:3].detach().clone(), x.lora_b.weight[:, :3].detach().clone())
            for n, x in lora_layers(m).items()}
    with torch.no_grad():
        for x in lora_layers(m).values():
            x.lora_b.weight[:, 3:].mul_(0.9 if shrink else 1.1)
    assert rule.finish() == (3 if shrink else 4)
    for n, x in lora_layers(m).items():
        assert x.rank == (3 if shrink else 4)
        torch.testing.assert_close(x.lora_a.weight[:3], kept[n][0])
        torch.testing.assert_close(x.lora_b.weight[:, :3], kept[n][1])
    assert RankSelfPruning.from_payload(m, _payload_for(m, 1, 0, 0.5)) is None  # nothing to prune


def test_hetlora_accepts_the_pruned_rank_only_and_sends_it_from_then_on():
    s = _strategy("hetlora", hetlora_gamma=0.5, hetlora_lambda=0.2)
    p = s.payload("c0", 4, 0)
    assert (p.rank, p.prune_to, p.tail_penalty) == (4, 2, 0.2)
    g = torch.Generator().manual_seed(11)
    s.payload("c1", 4, 0)
    rep = s.aggregate([_het_update("c0", 2, 5, g), _het_update("c1", 3, 5, g)])
    assert rep.accepted == ["c0"] and "payload was for rank 4" in rep.rejected["c1"]
    p = s.payload("c0", 4, s.version)  # pruned: rank 2 now, and it may prune again to 1
    assert (p.rank, p.prune_to) == (2, 1) and all(f["A"].shape[0] == 2 for f in p.factors.values())
    assert s.payload("c1", 4, s.version).rank == 4  # another client keeps its own rank
    restored = _strategy("hetlora", hetlora_gamma=0.5, hetlora_lambda=0.2)
    restored.load_state_dict(copy.deepcopy(s.state_dict()))
    assert restored.payload("c0", 4, s.version).rank == 2


def test_hetlora_config_keys_are_validated_and_reach_only_the_rules_that_take_them():
    from fedlora.config import load_config

    cfg = load_config(None, values={"strategy.name": "hetlora", "strategy.hetlora_lambda": 0.5,
                                    "strategy.hetlora_gamma": 0.75})
    assert cfg.strategy_kwargs() == {"hetlora_lambda": 0.5, "hetlora_gamma": 0.75}
    assert load_config(None, values={"strategy.name": "ffa"}).strategy_kwargs() == {}
    with pytest.raises(ValueError, match="hetlora_gamma"):
        load_config(None, values={"strategy.name": "hetlora", "strategy.hetlora_gamma": 1.0})
    with pytest.raises(ValueError, match="hetlora_lambda"):
        load_config(None, values={"strategy.name": "hetlora", "strategy.hetlora_lambda": -1.0})
    with pytest.raises(ValueError, match="hetlora_gamma"):
        create_strategy("hetlora", layers=layer_specs(), r_max=2, scale=1.0, hetlora_gamma=0.0)


def test_pruning_fields_survive_the_wire():
    from fedlora.flower_io import payload_to_record, record_to_payload
    from fedlora.loopback import ensure_task_identity

    ensure_task_identity()
    s = _strategy("hetlora", hetlora_gamma=0.5, hetlora_lambda=0.25)
    back = record_to_payload(payload_to_record(s.payload("c0", 4, 0)))
    assert (back.rank, back.prune_to, back.tail_penalty) == (4, 2, 0.25)
    plain = record_to_payload(payload_to_record(_strategy("fedavg").payload("c0", 4, 0)))
    assert (plain.prune_to, plain.tail_penalty) == (0, 0.0)


@pytest.mark.parametrize("name", ["ffa", "flora", "rolora", "fedsvd"])
def test_a_seeded_a_travels_as_its_seed_and_the_client_draws_the_servers_a(name):
    """FFA-LoRA's frozen A, FLoRA's fresh A (and RoLoRA's / FedSVD's until A moves) go out as seeds:
    through Flower's records a float32 client holds exactly the float64 server's A, cast."""
    from fedlora.flower_io import payload_to_record, record_to_payload
    from fedlora.loopback import ensure_task_identity

    ensure_task_identity()
    s = _strategy(name)
    for rank in (1, 3, 4):
        p = s.payload(f"c{rank}", rank, 0)
        rd = payload_to_record(p)
        assert not any(k.endswith("::A") for k in rd.array_records["fedlora.factors"])
        back = record_to_payload(rd)
        assert back.a_seeds == p.a_seeds and len(p.a_seeds) == len(SHAPES)
        m = Multi(0, rank, S, "lora", dtype=torch.float32)
        apply_payload(m, back)
        for n, layer in lora_layers(m).items():
            if name == "flora":
                want = kaiming_a(s.r_max, SHAPES[n][1], s.round_seed(list(SHAPES).index(n)), F64)
            else:
                want = s.A[n]
            assert torch.equal(layer.lora_a.weight, want[:rank].float())


def test_an_a_written_in_place_travels_as_numbers_and_a_float32_server_draw_reaches_a_float64_client():
    s = create_strategy("ffa", layers=layer_specs(), r_max=4, scale=S, dtype=torch.float32, seed=2)
    p = s.payload("c0", 3, 0)
    assert p.a_seeds and p.a_seed_dtype == "float32"
    m = Multi(0, 3, S, "lora", dtype=F64)  # a float64 client gets the float32 draw, cast: as if sent
    apply_payload(m, p)
    for n, layer in lora_layers(m).items():
        assert torch.equal(layer.lora_a.weight, s.A[n][:3].double())
    with torch.no_grad():  # a rule (or plugin) that moves A in place
        s.A["enc.v"].mul_(2.0)
    q = s.payload("c0", 3, 0)
    assert q.a_seeds == {} and all(torch.equal(f["A"], s.A[n][:3]) for n, f in q.factors.items())


def test_malformed_seeds_are_named():
    from flwr.app import ConfigRecord

    from fedlora.flower_io import payload_to_record, record_to_payload
    from fedlora.loopback import ensure_task_identity

    ensure_task_identity()
    rd = payload_to_record(_strategy("ffa").payload("c0", 2, 0))
    for bad in (-1, 2**63, 1.5):
        rd["fedlora.a_seeds"] = ConfigRecord({"enc.q": bad})
        msg = r"record 'fedlora.a_seeds': the seed of layer 'enc.q' must be an integer in \[0, 2\*\*63\)"
        with pytest.raises(ValueError, match=msg):
            record_to_payload(rd)


@pytest.mark.parametrize("name", ["rolora", "fedsvd"])
def test_once_a_moves_it_travels_as_numbers_also_after_a_resume(name):
    s = _strategy(name)
    gen = torch.Generator().manual_seed(3)
    ranks, n_ex, clients = [2, 4], [3, 5], {}
    while s.payload("c0", 2, 0).a_seeds:  # RoLoRA: after its first A round; FedSVD: after round 1
        s.aggregate(_round(s, ranks, n_ex, gen, clients)[0])
    assert s.round == (2 if name == "rolora" else 1)
    p = s.payload("c0", 2, 0)
    assert all(torch.equal(f["A"], s.A[n][:2]) for n, f in p.factors.items())
    resumed = _strategy(name)
    resumed.load_state_dict(copy.deepcopy(s.state_dict()))
    q = resumed.payload("c0", 2, 0)
    assert q.a_seeds == {} and q.bytes_down == p.bytes_down
    fresh = _strategy("ffa")
    fresh.aggregate(_round(fresh, ranks, n_ex, gen, {})[0])
    again = _strategy("ffa")
    again.load_state_dict(copy.deepcopy(fresh.state_dict()))  # FFA's A never moves: still seeds
    assert again.payload("c0", 2, 0).a_seeds == fresh.payload("c0", 2, 0).a_seeds != {}


# ---- all five: validation, checkpoints, DP ------------------------------------------------------

NEW = ["ffa", "rolora", "fedsvd", "flexlora", "hetlora"]


@pytest.mark.parametrize("name", NEW)
def test_a_rejected_update_changes_nothing_and_bytes_are_the_tensors(name):
    s = _strategy(name)
    gen = torch.Generator().manual_seed(12)
    ups, _ = _round(s, [2, 4], [3, 5], gen)
    before = state_tensors(s)
    bad = copy.deepcopy(ups[1])
    next(iter(bad.factors.values()))[sorted(s.round_uploads())[0]][0, 0] = float("nan")
    rep = s.aggregate([bad])
    assert rep.accepted == [] and "non-finite" in rep.rejected["c1"]
    after = state_tensors(s)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    rep = s.aggregate(ups)
    for u in ups:
        assert rep.bytes_up[u.client_id] == sum(t.numel() * 8 for f in u.factors.values() for t in f.values())


@pytest.mark.parametrize("name", ["ffa", "fedsvd"])
def test_dp_trains_b_alone(name, monkeypatch):
    from opacus.optimizers import DPOptimizer

    from fedlora.lora import LoRAConfig, inject_lora
    from fedlora.models import get_model
    from fedlora.privacy import PrivacyConfig, PrivacyState, train_private
    from fedlora.synthetic import SyntheticTask

    model = get_model("tiny", seed=0)
    names = inject_lora(model, LoRAConfig(targets=["attn.q", "attn.v"], rank=2, scale=2.0,
                                          trainable=["head"]))
    layers = {n: LayerSpec(m.out_features, m.in_features) for n, m in lora_layers(model).items()}
    s = create_strategy(name, layers=layers, r_max=4, scale=2.0, seed=1)
    apply_payload(model, s.payload("c0", 2, 0))
    seen = []
    clip0 = DPOptimizer.clip_and_accumulate

    def clip(self):
        seen.append({id(p) for p in self.params if p.grad_sample is not None})
        clip0(self)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", clip)
    A0 = {n: lora_layers(model)[n].lora_a.weight.detach().clone() for n in names}
    B0 = {n: lora_layers(model)[n].lora_b.weight.detach().clone() for n in names}
    train_private(model, SyntheticTask().generate(100, seed=1),
                  cfg=PrivacyConfig(enabled=True, noise_multiplier=1.0), state=PrivacyState(),
                  batch_size=20, steps=2, planned_total_steps=2, optim=OptimConfig(lr=1e-2),
                  device="cpu", seed=0)
    a_ids = {id(m.lora_a.weight) for m in lora_layers(model).values()}
    b_ids = {id(m.lora_b.weight) for m in lora_layers(model).values()}
    assert seen and all(b_ids <= ids and not (a_ids & ids) for ids in seen)  # per-sample grads: B's
    for n, m in lora_layers(model).items():
        assert torch.equal(m.lora_a.weight, A0[n]) and not torch.equal(m.lora_b.weight, B0[n])


@pytest.mark.parametrize("name", ["fedsvd", "flexlora"])
def test_a_failing_svd_rejects_the_round_and_changes_nothing(name, monkeypatch):
    s = _strategy(name)
    ups, _ = _round(s, [2, 4], [3, 5], torch.Generator().manual_seed(13))
    before = state_tensors(s)

    def fail(*a, **k):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", fail)
    rep = s.aggregate(ups)
    assert rep.accepted == [] and all("SVD" in r for r in rep.rejected.values()) and s.version == 0
    after = state_tensors(s)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("mode", ["reject", "clip"])
def test_norm_bound_measures_a_pruned_update_against_the_slice_it_was_sent(mode):
    from fedlora.strategies import NormBound

    s = _strategy("hetlora", hetlora_gamma=0.5, norm_bound=NormBound(mode, multiple=2.0))
    sent = {f"c{i}": s.payload(f"c{i}", 4, 0).factors for i in range(4)}
    g = torch.Generator().manual_seed(14)

    def moved(cid, r, size):  # the leading r-slice of what it was sent, moved by `size` per factor
        def noise(t):
            return t + size * torch.randn(t.shape, generator=g, dtype=F64)

        return ClientUpdate(cid, r, 5, 0, {n: {"A": noise(f["A"][:r]), "B": noise(f["B"][:, :r])}
                                           for n, f in sent[cid].items()})

    ups = [moved("c0", 4, 0.1), moved("c1", 2, 0.1), moved("c2", 4, 0.1), moved("c3", 2, 5.0)]
    rep = s.aggregate(ups)
    if mode == "reject":  # c1 pruned and moved little: within the bound; c3 pruned and moved far
        assert rep.accepted == ["c0", "c1", "c2"] and "norm bound" in rep.rejected["c3"]
    else:
        assert rep.accepted == ["c0", "c1", "c2", "c3"]
        assert s.ranks == {"c0": 4, "c1": 2, "c2": 4, "c3": 2}
