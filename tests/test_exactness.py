"""The exactness diagnostic in factored form equals the dense formula (float64, mixed ranks)."""

from __future__ import annotations

import pytest
import torch
from strategy_helpers import (
    SHAPES,
    Multi,
    apply_payload,
    effective,
    layer_specs,
    make_update,
    train_randomly,
    w0,
)

from fedlora.strategies import create_strategy
from fedlora.strategies.exactness import Term, frobenius

F64 = torch.float64


@pytest.mark.parametrize("d, k, ranks", [(9, 7, [1, 2]), (40, 30, [3, 5, 2]), (12, 10, [4, 4, 6, 5])])
def test_norm_of_a_sum_of_terms_is_the_dense_norm(d, k, ranks):
    # small total rank takes the QR path, large the dense one; shared tensors merge
    g = torch.Generator().manual_seed(d)
    Us = [torch.randn(d, r, generator=g, dtype=F64) for r in ranks]
    Vs = [torch.randn(r, k, generator=g, dtype=F64) for r in ranks]
    D = torch.randn(d, k, generator=g, dtype=F64)
    cs = [float(c) for c in torch.randn(len(ranks), generator=g, dtype=F64)]
    terms = [Term(c, U, V) for c, U, V in zip(cs, Us, Vs)]
    direct = sum(c * U @ V for c, U, V in zip(cs, Us, Vs))
    assert frobenius(terms) == pytest.approx(float(direct.norm()), rel=1e-12)
    shared = terms + [Term(-0.5, Us[0], Vs[0]), Term(2.0, Us[-1], torch.ones_like(Vs[-1]))]
    direct2 = direct - 0.5 * Us[0] @ Vs[0] + 2.0 * Us[-1] @ torch.ones_like(Vs[-1])
    assert frobenius(shared) == pytest.approx(float(direct2.norm()), rel=1e-12)
    assert frobenius(terms + [Term(1.0, D)]) == pytest.approx(float((direct + D).norm()), rel=1e-12)
    assert frobenius(terms + [Term(-c, U, V) for c, U, V in zip(cs, Us, Vs)]) == 0.0


# (flexlora is not here: its global model is exact and its error is the clients' truncation gap,
# checked against its own formula in test_strategies_next)
@pytest.mark.parametrize("name", ["fedavg", "fedex", "flora", "fedsb", "ffa", "rolora", "fedsvd", "hetlora"])
@pytest.mark.parametrize("seed", [0, 1])
def test_reported_error_equals_the_dense_formula(name, seed):
    s = create_strategy(name, layers=layer_specs(), r_max=4, scale=1.25, dtype=F64, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    if s.init_from:
        s.initialize({n: torch.randn(d, k, generator=gen, dtype=F64) for n, (d, k) in SHAPES.items()})
    ranks, n_ex = [1, 4, 2, 3, 4], [3, 8, 5, 1, 6]
    clients = [Multi(0, r, 1.25, s.adapter) for r in ranks]
    base = w0(clients[0])
    held = [0] * len(ranks)  # the base version each client holds
    for _ in range(3):
        old = {n: base[n] + s.global_delta(n) for n in SHAPES}
        ups, W = [], []
        for i, m in enumerate(clients):
            p = s.payload(f"c{i}", ranks[i], held[i])
            apply_payload(m, p)
            held[i] = p.base_version
            train_randomly(m, gen)
            ups.append(make_update(m, p, n_ex[i]))
            W.append(effective(m))
        rep = s.aggregate(ups)
        p = [rep.weights[f"c{i}"] for i in range(len(ranks))]  # HetLoRA's are not the sample weights
        if s.name != "hetlora":
            assert p == pytest.approx([ni / sum(n_ex) for ni in n_ex], rel=1e-15)
        target = {n: sum(pi * Wi[n] for pi, Wi in zip(p, W)) for n in SHAPES}
        num = sum(float((base[n] + s.global_delta(n) - target[n]).pow(2).sum()) for n in SHAPES) ** 0.5
        den = sum(float((target[n] - old[n]).pow(2).sum()) for n in SHAPES) ** 0.5
        if s.exact:
            assert rep.aggregation_error < 1e-12 and num / den < 1e-12
        else:
            assert rep.aggregation_error == pytest.approx(num / den, rel=1e-9)
            assert rep.aggregation_error > 1e-3
        assert rep.diagnostic_seconds <= rep.agg_seconds


def test_the_diagnostic_can_be_switched_off():
    s = create_strategy("fedavg", layers=layer_specs(), r_max=2, scale=1.0, dtype=F64, check_exactness=False)
    m = Multi(0, 2, 1.0, "lora")
    p = s.payload("c0", 2, 0)
    apply_payload(m, p)
    train_randomly(m, torch.Generator().manual_seed(0))
    rep = s.aggregate([make_update(m, p, 3)])
    assert rep.aggregation_error is None and rep.diagnostic_seconds == 0.0


@pytest.mark.parametrize("ranks", [[1, 2, 1], [6, 9, 12, 5]])  # the QR path, the dense path
def test_layer_norms_share_terms_and_equal_the_dense_norms(ranks):
    from fedlora.strategies.exactness import layer_norms

    g = torch.Generator().manual_seed(len(ranks))
    d, k = 40, 40
    ts = [Term(float(torch.randn(1, generator=g)), torch.randn(d, r, generator=g, dtype=F64),
               torch.randn(r, k, generator=g, dtype=F64)) for r in ranks]
    target, change = ts[:-1], [ts[0], ts[-1]]  # a term on both sides cancels in the difference
    dense = {id(t): t.c * t.U @ t.V for t in ts}
    T = sum(dense[id(t)] for t in target)
    C = sum(dense[id(t)] for t in change)
    num, den = layer_norms(change, target)
    assert num == pytest.approx(float((C - T).norm()), rel=1e-12)
    assert den == pytest.approx(float(T.norm()), rel=1e-12)
