"""Per-strategy rules against direct formulas, validation, bytes, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from strategy_helpers import (
    SHAPES,
    Multi,
    apply_payload,
    layer_specs,
    make_update,
    state_tensors,
    train_randomly,
)

from fedlora.client import head_state
from fedlora.lora import LoRALinear, kaiming_a, lora_layers
from fedlora.strategies import (
    STRATEGIES,
    BaseDelta,
    ClientUpdate,
    Dense,
    LayerSpec,
    LowRank,
    create_strategy,
)

F64 = torch.float64


def _strategy(name, r_max=4, **kw):
    s = create_strategy(name, layers=layer_specs(), r_max=r_max, scale=1.5, dtype=F64, seed=2, **kw)
    if name == "fedsb":
        g = torch.Generator().manual_seed(9)
        s.initialize({n: torch.randn(d, k, generator=g, dtype=F64) for n, (d, k) in SHAPES.items()})
    return s


def _round(s, ranks, n_ex=None, gen=None, clients=None, held=None):
    gen = gen or torch.Generator().manual_seed(0)
    mode = "sb" if s.name == "fedsb" else "lora"
    clients = clients or [Multi(0, r, s.scale, mode) for r in ranks]
    ups = []
    for i, r in enumerate(ranks):
        p = s.payload(f"c{i}", r, held[i] if held else s.version)
        apply_payload(clients[i], p)
        train_randomly(clients[i], gen, s.name)
        ups.append(make_update(clients[i], p, (n_ex or [10] * len(ranks))[i]))
    return ups, clients


def test_registry_and_unknown_name():
    assert list(STRATEGIES)[:5] == ["fedavg", "fedex", "flora", "fedsb", "fedsa"]  # + any test plugins
    with pytest.raises(ValueError, match="choose one of"):
        create_strategy("fedprox", layers=layer_specs(), r_max=2, scale=1.0)
    with pytest.raises(ValueError, match="weighting"):
        create_strategy("fedex", layers=layer_specs(), r_max=2, scale=1.0, weighting="norm")
    with pytest.raises(ValueError, match="rank must be"):
        create_strategy("fedex", layers=layer_specs(), r_max=2, scale=1.0).payload("c", 3, 0)


@pytest.mark.parametrize("name", ["fedavg", "fedsa"])
def test_per_rank_component_average_direct_formula(name):
    s = _strategy(name)
    A0 = {n: s.A[n].clone() for n in SHAPES}
    B0 = {n: s.B[n].clone() for n in SHAPES} if name == "fedavg" else None
    ranks, n_ex = [1, 2, 2], [10, 30, 60]
    ups, _ = _round(s, ranks, n_ex)
    s.aggregate(ups)
    for n in SHAPES:
        for j in range(4):
            holders = [(u, w) for u, w in zip(ups, n_ex) if u.rank > j]
            if not holders:  # nobody trained component j: unchanged
                torch.testing.assert_close(s.A[n][j], A0[n][j])
                if B0:
                    torch.testing.assert_close(s.B[n][:, j], B0[n][:, j])
                continue
            tot = sum(w for _, w in holders)
            torch.testing.assert_close(s.A[n][j], sum(w * u.factors[n]["A"][j] for u, w in holders) / tot)
            if B0:
                torch.testing.assert_close(s.B[n][:, j],
                                           sum(w * u.factors[n]["B"][:, j] for u, w in holders) / tot)


def test_fedsa_b_never_leaves_the_client_and_survives_rounds():
    s = _strategy("fedsa")
    ups, clients = _round(s, [2, 4])
    assert all(set(f) == {"A"} for u in ups for f in u.factors.values())
    B_before = {n: m.lora_b.weight.detach().clone() for n, m in lora_layers(clients[0]).items()}
    s.aggregate(ups)
    p = s.payload("c0", 2, s.version)
    assert all(set(f) == {"A"} for f in p.factors.values()) and p.head is None
    apply_payload(clients[0], p)
    for n, m in lora_layers(clients[0]).items():
        torch.testing.assert_close(m.lora_b.weight, B_before[n])  # personal B intact
        torch.testing.assert_close(m.lora_a.weight, s.A[n][:2])  # shared A loaded
    with pytest.raises(ValueError, match="no global model"):
        s.global_delta("enc.q")
    bad = copy.deepcopy(ups[0])
    bad.factors = {n: {"A": f["A"], "B": torch.zeros(SHAPES[n][0], 2, dtype=F64)}
                   for n, f in bad.factors.items()}
    bad.base_version = s.version
    rep = s.aggregate([bad])
    assert "carry exactly ['A']" in rep.rejected["c0"]


def test_flora_fresh_adapters_each_round():
    s = _strategy("flora")
    first = s.payload("c0", 2, 0).a_seeds
    ups, clients = _round(s, [2, 3])
    s.aggregate(ups)
    p, wide = s.payload("c0", 2, s.version), s.payload("c1", 4, s.version)
    assert p.reset and all(f == {} for f in p.factors.values())  # A travels as its seed
    apply_payload(clients[0], p)
    for i, (n, m) in enumerate(lora_layers(clients[0]).items()):
        assert torch.count_nonzero(m.lora_b.weight) == 0  # B = 0: the fresh adapter adds nothing
        A = m.lora_a.weight
        assert p.a_seeds[n] == s.round_seed(i)
        assert torch.equal(A, kaiming_a(2, SHAPES[n][1], p.a_seeds[n], A.dtype))
        assert float(A.detach().abs().max()) <= 1 / SHAPES[n][1] ** 0.5  # Kaiming-uniform(a=√5) bound
        # every client of the round draws the same A (leading slice), a new round a new one
        assert wide.a_seeds[n] == p.a_seeds[n] != first[n]
        assert not torch.allclose(kaiming_a(2, SHAPES[n][1], first[n], A.dtype), A)


def test_flora_and_fedex_agree_after_one_full_round():
    """One round from the same start: the exact strategies give the same global model."""
    sx, sf = _strategy("fedex"), _strategy("flora")
    gen = torch.Generator().manual_seed(4)
    ups_x, ups_f = [], []
    for i, r in enumerate([2, 4, 4]):
        mx, mf = Multi(0, r, 1.5, "lora"), Multi(0, r, 1.5, "lora")
        px, pf = sx.payload(f"c{i}", r, 0), sf.payload(f"c{i}", r, 0)
        apply_payload(mx, px)
        apply_payload(mf, pf)
        train_randomly(mx, gen, "fedex")
        for a, b in zip(lora_layers(mf).values(), lora_layers(mx).values()):
            a.set_factors_(b.lora_a.weight.detach(), b.lora_b.weight.detach())  # same trained factors
        # flora's base starts at W0, fedex's client base holds its tail (0 at version 0: B̄ = 0)
        ups_x.append(make_update(mx, px, 7 + i))
        ups_f.append(make_update(mf, pf, 7 + i))
    sx.aggregate(ups_x)
    sf.aggregate(ups_f)
    for n in SHAPES:
        torch.testing.assert_close(sx.global_delta(n), sf.global_delta(n), rtol=1e-12, atol=1e-12)


def test_fedex_residual_transport_factored_vs_dense():
    big = {"w": LayerSpec(64, 48)}
    s = create_strategy("fedex", layers=big, r_max=2, scale=1.0, dtype=F64)
    gen = torch.Generator().manual_seed(0)

    def upd(cid, r):
        return ClientUpdate(cid, r, 5, s.version, {"w": {"A": torch.randn(r, 48, generator=gen, dtype=F64),
                                                         "B": torch.randn(64, r, generator=gen, dtype=F64)}})

    s.aggregate([upd("a", 2), upd("b", 2)])
    d = s.base.deltas[1]["w"]
    assert isinstance(d, LowRank) and d.U.shape == (64, 6) and d.V.shape == (6, 48)  # ρ = 2+2+2
    s.aggregate([upd("a", 2), upd("b", 2)])
    p = s.payload("late", 2, 1)  # missed one small residual: it comes factored, not reset
    assert [bd.version for bd in p.base_deltas] == [2] and not p.base_deltas[0].reset
    assert isinstance(p.base_deltas[0].layers["w"], LowRank)
    s.aggregate([upd(f"c{i}", 2) for i in range(20)])  # ρ = 42: 42·112 > 64·48 → dense
    assert isinstance(s.base.deltas[3]["w"], Dense) and s.base.deltas[3]["w"].D.shape == (64, 48)
    p = s.payload("later", 2, 1)  # factored + dense > one dense full delta → a reset
    assert len(p.base_deltas) == 1 and p.base_deltas[0].reset
    torch.testing.assert_close(p.base_deltas[0].layers["w"].D, s.base.cum["w"])


@pytest.mark.parametrize("name", ["fedex", "flora"])
@pytest.mark.parametrize("rank", [2, 4])
def test_a_new_client_catches_up_factored_when_fewer_numbers(name, rank):
    """A client at version 0 (W0) gets the missed deltas factored while they are fewer numbers
    than one dense reset (FedEx: plus its current tail as factors), and its model is then the
    global one; once dense is cheaper it gets the dense reset."""
    big = {"w": LayerSpec(64, 48)}
    s = create_strategy(name, layers=big, r_max=4, scale=1.5, dtype=F64)
    gen = torch.Generator().manual_seed(1)

    def rnd(n):
        ups = []
        for i in range(n):
            r = (2, 4)[i % 2]
            p = s.payload(f"c{i}", r, s.version)
            sent = p.factors["w"]["A"] if name == "fedex" else kaiming_a(r, 48, p.a_seeds["w"], F64)
            A = sent + 0.1 * torch.randn(r, 48, generator=gen, dtype=F64)
            ups.append(ClientUpdate(f"c{i}", r, 5, s.version,
                                    {"w": {"A": A, "B": torch.randn(64, r, generator=gen, dtype=F64)}}))
        s.aggregate(ups)

    rnd(2)
    rnd(2)
    p = s.payload("new", rank, 0)
    assert p.base_deltas and not any(bd.reset for bd in p.base_deltas)
    assert all(isinstance(d, LowRank) for bd in p.base_deltas for d in bd.layers.values())
    numbers = sum(d.numel() for bd in p.base_deltas for d in bd.layers.values())
    assert numbers < 64 * 48
    base = sum(d.to_dense() for bd in p.base_deltas for d in bd.layers.values())
    W = base + s.scale * p.factors["w"]["B"] @ p.factors["w"]["A"] if name == "fedex" else base
    torch.testing.assert_close(W, s.global_delta("w"), rtol=1e-12, atol=1e-12)
    rnd(12)  # a large stack: the dense reset is now fewer numbers
    p = s.payload("newer", rank, 0)
    assert len(p.base_deltas) == 1 and p.base_deltas[0].reset


def test_fold_into_bf16_model_keeps_fp32_master():
    s = _strategy("fedex")
    ups, _ = _round(s, [4, 4, 2])
    s.aggregate(ups)
    m = Multi(0, 4, 1.5, "lora", dtype=torch.bfloat16)
    p = s.payload("new", 4, 0)
    assert p.base_deltas and p.base_deltas[0].reset
    apply_payload(m, p)
    for n, layer in lora_layers(m).items():
        assert layer.base_delta.dtype == torch.float32
        assert layer.base.weight.dtype == torch.bfloat16
        torch.testing.assert_close(layer.base_delta, s.base.cum[n].float())


def test_fedsb_initialisation_matches_direct_svd_and_counts_bytes():
    layers = {"w": LayerSpec(9, 7)}
    s = create_strategy("fedsb", layers=layers, r_max=3, scale=1.0, dtype=F64)
    with pytest.raises(RuntimeError, match="initialize"):
        s.payload("c", 2, 0)
    G = torch.randn(9, 7, generator=torch.Generator().manual_seed(3), dtype=F64)
    s.initialize({"w": G}, eta=0.5)
    U = -0.5 * torch.sign(G)
    P, S, Qh = torch.linalg.svd(U.T, full_matrices=False)
    best = (P[:, :3] @ torch.diag(S[:3]) @ Qh[:3]).T  # rank-3 truncation of U, d×k
    torch.testing.assert_close(s.B["w"] @ s.R["w"] @ s.A["w"], best)
    torch.testing.assert_close(s.R["w"], torch.diag(S[:3]))
    torch.testing.assert_close(s.A["w"] @ s.A["w"].T, torch.eye(3, dtype=F64))  # orthonormal
    first = s.payload("c", 3, 0)
    assert set(first.factors["w"]) == {"A", "B", "R"}
    assert first.base_version == s.version == 1  # the init is a version step (0 is W0 itself)
    u = ClientUpdate("c", 3, 4, first.base_version, {"w": {"R": first.factors["w"]["R"] + 1}})
    assert s.aggregate([u]).accepted == ["c"]
    later = s.payload("c", 3, s.version)
    assert set(later.factors["w"]) == {"R"} and later.base_deltas == []
    assert first.bytes_down == later.bytes_down + (3 * 7 + 9 * 3) * 8  # one-time B and A


def test_fedsb_round_uses_only_this_rounds_updates():
    """The reference multiround scripts average every stale R: here round t sees only round t."""
    s = _strategy("fedsb", r_max=3)
    ups, clients = _round(s, [3, 3])
    s.aggregate(ups)
    ups2, _ = _round(s, [3], clients=clients[:1])
    s.aggregate(ups2)  # one client, weight 1 → R̄ is exactly its R
    for n in SHAPES:
        torch.testing.assert_close(s.R[n], ups2[0].factors[n]["R"])


ALL = ["fedavg", "fedex", "flora", "fedsb", "fedsa", "ffa", "rolora", "fedsvd", "flexlora", "hetlora"]


@pytest.mark.parametrize("name", ALL)
def test_bad_updates_rejected_with_reasons_state_untouched(name):
    s = _strategy(name)
    ups, _ = _round(s, [2, 2])
    good, template = ups[0], ups[1]
    key = next(iter(template.factors["enc.q"]))

    def variant(cid, **changes):
        u = copy.deepcopy(template)
        u.client_id = cid
        for k, v in changes.items():
            setattr(u, k, v)
        return u

    def with_factor(t):
        f = copy.deepcopy(template.factors)
        f["enc.q"][key] = t
        return f

    bad = [
        variant("nan", factors=with_factor(torch.full_like(template.factors["enc.q"][key], float("nan")))),
        variant("int", factors=with_factor(template.factors["enc.q"][key].long())),
        variant("shape", factors=with_factor(torch.zeros(5, 5, dtype=F64))),
        variant("unknown", factors={**template.factors, "zzz": template.factors["enc.q"]}),
        variant("missing", factors={k: v for k, v in template.factors.items() if k != "enc.q"}),
        variant("rank", rank=9),
        variant("stale", base_version=s.version + 3),
        variant("noex", num_examples=0),
    ]
    before, v0 = state_tensors(s), s.version
    rep = s.aggregate(bad)
    assert rep.accepted == [] and set(rep.rejected) == {u.client_id for u in bad}
    expected = {"nan": "non-finite", "int": "not floating", "shape": "shape", "unknown": "unknown",
                "missing": "missing", "rank": "r_max", "stale": "stale base_version",
                "noex": "num_examples"}
    for cid, word in expected.items():
        assert word in rep.rejected[cid], (cid, rep.rejected[cid])
    after = state_tensors(s)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert s.version == v0 and s.round == 0
    # the good update in a mixed round is aggregated; the bad ones still change nothing extra
    rep = s.aggregate([good, bad[0], variant("dup")] + [copy.deepcopy(good)] * 2)
    assert rep.accepted == ["c0", "dup"] and "c0" not in rep.rejected
    assert "duplicate" in rep.rejected["c0#2"] and "duplicate" in rep.rejected["c0#3"]
    assert "non-finite" in rep.rejected["nan"]
    assert s.version == v0 + 1


def test_floating_factors_of_other_precision_are_cast():
    s = _strategy("fedex")
    ups, _ = _round(s, [2])
    u = ups[0]
    u.factors = {n: {k: t.float() for k, t in f.items()} for n, f in u.factors.items()}
    rep = s.aggregate([u])
    assert rep.accepted == ["c0"] and s.A["enc.q"].dtype == F64


def test_empty_round_changes_nothing():
    s = _strategy("fedex")
    before = state_tensors(s)
    rep = s.aggregate([])
    assert rep.accepted == [] and rep.version == 0
    assert all(torch.equal(before[k], v) for k, v in state_tensors(s).items())


def test_head_is_averaged_with_the_same_weights():
    class WithHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = LoRALinear(nn.Linear(4, 4, dtype=F64), 2, 1.0)
            self.head = nn.Linear(4, 2, dtype=F64)

    s = create_strategy("fedex", layers={"q": LayerSpec(4, 4)}, r_max=2, scale=1.0, dtype=F64)
    ms = [WithHead(), WithHead()]
    ups = []
    for i, (m, n) in enumerate(zip(ms, [1, 3])):
        p = s.payload(f"c{i}", 2, 0)
        apply_payload(m, p)
        with torch.no_grad():
            m.head.weight.fill_(float(i))
        ups.append(make_update(m, p, n, head_names=["head"]))
    s.aggregate(ups)
    torch.testing.assert_close(s.global_head()["head.weight"], torch.full((2, 4), 0.75, dtype=F64))
    p = s.payload("c0", 2, s.version)
    apply_payload(ms[0], p)
    torch.testing.assert_close(head_state(ms[0], ["head"])["head.weight"],
                               torch.full((2, 4), 0.75, dtype=F64))


@pytest.mark.parametrize("name", ALL)
def test_state_dict_roundtrip_continues_identically(name):
    s = _strategy(name, history=2)
    gen = torch.Generator().manual_seed(7)
    ups, clients = _round(s, [2, 4, 3], gen=gen)
    s.aggregate(ups)
    restored = _strategy(name, history=2)
    restored.load_state_dict(copy.deepcopy(s.state_dict()))
    ups2, _ = _round(s, [2, 4, 3], gen=torch.Generator().manual_seed(8),
                     clients=copy.deepcopy(clients))
    s.aggregate(ups2)
    ups3, _ = _round(restored, [2, 4, 3], gen=torch.Generator().manual_seed(8),
                     clients=copy.deepcopy(clients))
    restored.aggregate(ups3)
    assert restored.version == s.version == 2 + (name == "fedsb")  # Fed-SB's init is a version
    for a, b in zip(ups2, ups3):
        for n in SHAPES:
            for k in a.factors[n]:
                torch.testing.assert_close(a.factors[n][k], b.factors[n][k])
    if s.has_global_model:
        for n in SHAPES:
            torch.testing.assert_close(restored.global_delta(n), s.global_delta(n))
    with pytest.raises(ValueError, match="strategy"):
        _strategy("fedavg" if name != "fedavg" else "fedex").load_state_dict(s.state_dict())


def test_bytes_accounting_matches_tensor_sizes():
    s = _strategy("fedex")
    ups, _ = _round(s, [2, 4])
    rep = s.aggregate(ups)
    per = {f"c{i}": sum((d * r + r * k) * 8 for d, k in SHAPES.values()) for i, r in enumerate([2, 4])}
    assert rep.bytes_up == per
    assert rep.bytes_down == per  # round 0: adapter slices only, no base deltas yet
    p = s.payload("c0", 2, 0)  # it trained on version 0: it gets the residual it missed
    deltas = sum(t.numel() * 8 for bd in p.base_deltas for d in bd.layers.values()
                 for t in d.tensors().values())
    assert p.bytes_down == per["c0"] + deltas and deltas > 0
    assert isinstance(p.base_deltas[0], BaseDelta)


def test_fedsb_tails_travel_as_rmax_squared_cores():
    """Below r_max a client gets B[:, r:], A[r:] once; afterwards its tail changes cost r_max² per
    layer (the r×r R plus the core), not r_max(d+k) factors; and Sync still holds."""
    d, k, r_max, r = 40, 30, 6, 2
    layers = {"w": LayerSpec(d, k)}
    s = create_strategy("fedsb", layers=layers, r_max=r_max, scale=1.0, dtype=F64)
    g = torch.Generator().manual_seed(5)
    s.initialize({"w": torch.randn(d, k, generator=g, dtype=F64)})
    layer = LoRALinear(nn.Linear(k, d, dtype=F64), r, 1.0, mode="sb")
    model = nn.Module()
    model.w = layer
    first = s.payload("c", r, 0)
    assert set(first.frozen["w"]) == {"A_tail", "B_tail"}
    assert first.bytes_down == (r * r + r * k + d * r + (r_max - r) * (d + k) + r_max * r_max) * 8
    apply_payload(model, first)
    # another client moves R; our client's tail changes
    s.aggregate([ClientUpdate("o", r_max, 5, s.version, {"w": {"R": s.R["w"] + torch.randn(r_max, r_max,
                                                                                  generator=g, dtype=F64)}})])
    later = s.payload("c", r, first.base_version)
    assert later.frozen is None and later.bytes_down == (r * r + r_max * r_max) * 8
    apply_payload(model, later)
    want = layer.base.weight.detach() + s.global_delta("w")
    torch.testing.assert_close(layer.effective_weight(), want, rtol=1e-12, atol=1e-12)


class _DenseAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts out-of-place ops whose result is a d×k matrix (in-place ones write existing state)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = torch.Size(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not name.endswith("_") and isinstance(out, torch.Tensor) and out.shape == self.shape \
                and name not in ("view", "alias", "detach", "t", "transpose", "slice"):
            self.count += 1
        return out


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "fedsb"])  # (fedsb: r×r cores)
def test_no_dense_matrix_per_client_in_a_round(name):
    """A round's dense d×k allocations do not grow with the number of clients (aggregation), and
    a payload that travels factored forms none (catch-up, tails)."""
    layers = {"w": LayerSpec(96, 80)}
    counts = {}
    for k in (2, 6):
        s = create_strategy(name, layers=layers, r_max=4, scale=1.5, dtype=F64, check_exactness=False)
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            keys = sorted(s.round_uploads())
            shape = {"A": lambda r: (r, 80), "B": lambda r: (96, r)}
            ups = [ClientUpdate(f"c{i}", (2, 4)[i % 2], 5, s.version,
                                {"w": {key: torch.randn(*shape[key]((2, 4)[i % 2]), generator=gen, dtype=F64)
                                       for key in keys}}) for i in range(k)]
            with _DenseAllocations((96, 80)) as mode:
                s.aggregate(ups)
            counts[k] = mode.count
        with _DenseAllocations((96, 80)) as mode:
            p = s.payload("late", 2, 1)  # missed a round, rank below r_max
        if not any(isinstance(d, Dense) for bd in p.base_deltas for d in bd.layers.values()):
            assert mode.count == 0, f"{name}: a factored payload formed {mode.count} dense matrices"
    assert counts[2] == counts[6], f"{name}: dense allocations per round grow with K: {counts}"
