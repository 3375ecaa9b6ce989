"""Updates as the server receives them (decoded from Flower records into one flat buffer each):
the one-pass path gives the same global state as separate tensors, and still rejects every
non-finite or overflowing update with a reason and the state untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from strategy_helpers import (
    SHAPES,
    Multi,
    apply_payload,
    layer_specs,
    make_update,
    state_tensors,
    train_randomly,
)

from fedlora.flower_io import record_to_update, update_to_record
from fedlora.strategies import create_strategy

NAMES = ["fedavg", "fedex", "flora", "fedsb", "fedsa", "ffa", "rolora", "fedsvd", "flexlora", "hetlora"]


def _strategy(name, dtype=torch.float64):
    s = create_strategy(name, layers=layer_specs(), r_max=4, scale=1.5, dtype=dtype, seed=3)
    if name == "fedsb":
        g = torch.Generator().manual_seed(9)
        s.initialize({n: torch.randn(d, k, generator=g, dtype=dtype) for n, (d, k) in SHAPES.items()})
    return s


def _updates(s, ranks, gen, dtype=torch.float64):
    mode = "sb" if s.name == "fedsb" else "lora"
    ups = []
    for i, r in enumerate(ranks):
        m = Multi(i, r, s.scale, mode, dtype=dtype)
        p = s.payload(f"c{i}", r, s.version)
        apply_payload(m, p)
        train_randomly(m, gen, s.name)
        ups.append(make_update(m, p, 10 + 7 * i))
    return ups


def _wire(u):
    return record_to_update(update_to_record(u))


def _same_state(a, b):
    sa, sb = state_tensors(a), state_tensors(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_decoded_updates_are_one_flat_buffer_and_aggregate_like_separate_tensors(name):
    gen = torch.Generator().manual_seed(1)
    flat_s, sep_s = _strategy(name), _strategy(name)
    for ranks in ([1, 3, 3, 4, 2], [4, 4, 2], [2]):
        ups = _updates(sep_s, ranks, gen)
        for u in ups:  # the same payloads sent by both, so both account the same bytes down
            flat_s.payload(u.client_id, u.rank, flat_s.version)
        wire = [_wire(u) for u in ups]
        assert all(u.flat is not None for u in wire) and all(u.flat is None for u in ups)
        # mixed in one round: half decoded, half separate
        mixed = [w if i % 2 else u for i, (u, w) in enumerate(zip(ups, wire))]
        rep_flat, rep_sep = flat_s.aggregate(mixed), sep_s.aggregate(ups)
        assert rep_flat.accepted == rep_sep.accepted == [u.client_id for u in ups]
        assert rep_flat.weights == rep_sep.weights
        assert rep_flat.bytes_up == rep_sep.bytes_up
        _same_state(flat_s, sep_s)


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_values_in_flat_updates_are_found_and_named(name):
    gen = torch.Generator().manual_seed(2)
    s = _strategy(name)
    ups = _updates(s, [2, 2, 2, 4, 3], gen)
    wire = [_wire(u) for u in ups]
    key = sorted(s.uploads)[-1]
    wire[1].factors["enc.v"][key][0, 0] = float("nan")
    wire[2].factors["dec.o"][key][-1, -1] = float("inf")  # same rank group as c1
    wire[4].factors["enc.q"][key][0, 1] = float("-inf")   # a group of its own
    clean = _strategy(name)
    clean.load_state_dict(copy.deepcopy(s.state_dict()))
    rep = s.aggregate(wire)
    assert rep.accepted == ["c0", "c3"]
    assert set(rep.rejected) == {"c1", "c2", "c4"}
    for cid, layer in (("c1", "enc.v"), ("c2", "dec.o"), ("c4", "enc.q")):
        assert "non-finite" in rep.rejected[cid] and layer in rep.rejected[cid], rep.rejected[cid]
    ref = clean.aggregate([ups[0], ups[3]])
    assert ref.weights == rep.weights
    _same_state(s, clean)


@pytest.mark.parametrize("name", ["fedex", "flora"])
def test_updates_whose_product_would_overflow_are_rejected_and_change_nothing(name):
    gen = torch.Generator().manual_seed(3)
    s = _strategy(name, dtype=torch.float32)
    ups = [_wire(u) for u in _updates(s, [2, 3], gen, dtype=torch.float32)]
    for u in ups:  # finite, but s·B·A ≈ 1e40 does not fit in float32
        for f in u.factors.values():
            f["A"].fill_(1e20)
            f["B"].fill_(1e20)
    before, v = state_tensors(s), s.version
    rep = s.aggregate(ups)
    assert rep.accepted == [] and set(rep.rejected) == {"c0", "c1"}
    assert all("overflowing" in r for r in rep.rejected.values()), rep.rejected
    assert s.version == v and all(torch.equal(before[k], t) for k, t in state_tensors(s).items())


def test_flora_rejects_a_factor_beyond_the_magnitude_limit_even_if_its_product_is_small():
    # B·A is small, but B alone is beyond what a round can sum in float32: the per-factor limit is
    # what keeps every rule's sums and products finite, so the update is rejected (alone)
    gen = torch.Generator().manual_seed(4)
    s = _strategy("flora", dtype=torch.float32)
    ups = [_wire(u) for u in _updates(s, [4, 2], gen, dtype=torch.float32)]
    for f in ups[0].factors.values():
        f["B"].fill_(1e37)
        f["A"].fill_(1e-30)
    rep = s.aggregate(ups)
    assert rep.accepted == ["c1"] and "beyond" in rep.rejected["c0"], rep.rejected
    assert all(torch.isfinite(s.global_delta(n)).all() for n in SHAPES)
