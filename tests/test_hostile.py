"""Hostile replies: nobody takes over a round, nothing a reply holds crashes it, state untouched.

Each attack was accepted before (see the issue "Hostile clients, crashes and corrupted files"):
an inflated or fractional sample count, a finite but huge update, a reply that cannot be decoded.
"""

from __future__ import annotations

import copy
import json
import math

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
from fedlora.strategies import NormBound, create_strategy

NAMES = ["fedavg", "fedex", "flora", "fedsb", "fedsa", "ffa", "rolora", "fedsvd", "flexlora", "hetlora"]


def _strategy(name, dtype=torch.float32, **kw):
    s = create_strategy(name, layers=layer_specs(), r_max=4, scale=2.0, dtype=dtype, seed=1, **kw)
    if s.init_from:
        g = torch.Generator().manual_seed(2)
        s.initialize({n: torch.randn(d, k, generator=g, dtype=dtype) for n, (d, k) in SHAPES.items()})
    return s


def _round(s, ranks, n_ex, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    ups = []
    for i, r in enumerate(ranks):
        m = Multi(i, r, s.scale, s.adapter, dtype=dtype)
        p = s.payload(f"c{i}", r, s.version if s.version == (1 if s.init_from else 0) else 0)
        p.head = None  # (these models have no head; a test gives the updates theirs: _with_heads)
        apply_payload(m, p)
        train_randomly(m, gen)
        ups.append(make_update(m, p, n_ex[i]))
    return ups


@pytest.mark.parametrize("name", NAMES)
def test_a_huge_finite_update_is_rejected_alone_and_the_honest_ones_aggregated(name):
    s = _strategy(name)
    clean = copy.deepcopy(s)
    ups = _round(s, [2, 4, 3], [5, 6, 7])
    _round(clean, [2, 4, 3], [5, 6, 7])  # the same payloads: the same bookkeeping
    for f in ups[1].factors.values():  # finite, but ~1e20: its products overflow float32
        for t in f.values():
            t.fill_(1e20)
    rep = s.aggregate(ups)
    ref = clean.aggregate([ups[0], ups[2]])
    assert rep.accepted == ["c0", "c2"] and set(rep.rejected) == {"c1"}
    assert "c1" not in rep.weights and "beyond" in rep.rejected["c1"] and "layer" in rep.rejected["c1"]
    assert rep.weights == ref.weights
    a, b = state_tensors(s), state_tensors(clean)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if s.has_global_model:
        assert all(torch.isfinite(s.global_delta(n)).all() for n in SHAPES)


def test_weights_are_not_bools_and_a_cap_holds_the_largest_share():
    s = _strategy("fedex")
    ups = _round(s, [2, 2, 2], [10, 10, 10])
    ups[0].num_examples = True
    assert "num_examples" in s.aggregate(ups).rejected["c0"]
    capped = _strategy("fedex", max_weight_share=0.5)
    ups = _round(capped, [2, 2, 4], [10**12, 30, 10])
    rep = capped.aggregate(ups)
    # 10**12 alone would be weight ≈ 1; capped at 0.5, the rest keeps its proportions (3:1)
    assert rep.weights["c0"] == pytest.approx(0.5)
    assert rep.weights["c1"] == pytest.approx(0.375) and rep.weights["c2"] == pytest.approx(0.125)
    assert math.fsum(rep.weights.values()) == pytest.approx(1.0)


def test_capped_weights_match_the_water_filling_formula():
    # caps applied repeatedly: p = [0.6, 0.3, 0.05, 0.05] with cap 0.35 -> [0.35, 0.35, 0.15, 0.15]
    s = _strategy("fedavg", max_weight_share=0.35)
    ups = _round(s, [2, 2, 2, 2], [60, 30, 5, 5])
    rep = s.aggregate(ups)
    assert [rep.weights[f"c{i}"] for i in range(4)] == pytest.approx([0.35, 0.35, 0.15, 0.15])


@pytest.mark.parametrize("key, value", [("num-examples", 2.9), ("num-examples", float("inf")),
                                        ("num-examples", [3]), ("rank", 2.7)])
def test_wire_values_are_exact_integers_or_the_reply_is_refused(key, value):
    s = _strategy("fedavg")
    (u,) = _round(s, [2], [3])
    rd = update_to_record(u)
    if key == "rank":
        rd.config_records["fedlora.update.meta"]["rank"] = value
    else:
        rd.metric_records["metrics"][key] = value
    with pytest.raises(ValueError, match=key):
        record_to_update(rd)


@pytest.mark.parametrize("mode", ["reject", "clip"])
def test_norm_bound_rejects_or_clips_the_outlier(mode):
    s = _strategy("fedsa", norm_bound=NormBound(mode, multiple=3.0))
    ups = _round(s, [2, 2, 2, 2], [5, 5, 5, 5])
    given = {n: s.A[n][:2].clone() for n in SHAPES}  # what each client was sent
    for f in ups[3].factors.values():
        f["A"].mul_(50.0)  # in range, but far bigger than the others
    sizes = [math.sqrt(sum(float((u.factors[n]["A"] - given[n]).pow(2).sum()) for n in SHAPES))
             for u in ups]
    bound = 3.0 * sorted(sizes)[1]
    rep = s.aggregate(ups)
    if mode == "reject":
        assert rep.accepted == ["c0", "c1", "c2"] and "norm bound" in rep.rejected["c3"]
    else:
        assert rep.accepted == ["c0", "c1", "c2", "c3"]
        # the clipped change has exactly the bound's norm: Ā = mean of the clipped uploads
        c = bound / sizes[3]
        for n in SHAPES:
            clipped = given[n] + c * (ups[3].factors[n]["A"] - given[n])
            want = sum(u.factors[n]["A"] for u in ups[:3]) + clipped
            torch.testing.assert_close(s.A[n][:2], want / 4)


def test_norm_bound_is_off_by_default():
    s = _strategy("fedsa")
    ups = _round(s, [2, 2, 2], [5, 5, 5])
    for f in ups[2].factors.values():
        f["A"].mul_(50.0)
    assert s.aggregate(ups).accepted == ["c0", "c1", "c2"]


def _tampering(client_app, tamper):
    def app(msg, ctx):
        reply = client_app(msg, ctx)
        if msg.metadata.message_type == "train" and int(ctx.node_config["partition-id"]) == 1:
            tamper(reply.content)
        return reply
    return app


@pytest.mark.parametrize("tamper, reason", [
    (lambda rd: rd.metric_records["metrics"].__setitem__("num-examples", 10**12), "declared"),
    (lambda rd: rd.metric_records["metrics"].__setitem__("num-examples", float("inf")), "integer"),
    (lambda rd: rd.config_records["fedlora.update.meta"].__setitem__("rank", 2.7), "integer"),
    (lambda rd: rd.array_records.pop("fedlora.update"), "undecodable"),
])
def test_a_hostile_reply_is_rejected_and_the_round_goes_on(tmp_path, tamper, reason):
    from fedlora.config import load_config
    from fedlora.loopback import load_apps, run_loopback

    client_app, server_app = load_apps()
    cfg = load_config(None, values={"rounds": 1, "clients.num": 3, "train.local_steps": 2,
                                    "run_dir": str(tmp_path / "run")})
    run_loopback(cfg, apps=(_tampering(client_app, tamper), server_app))
    (row,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    by = {c["id"]: c for c in row["clients"]}
    assert [c for c, r in by.items() if r["accepted"]] == ["client-0", "client-2"]
    assert reason in by["client-1"]["error"], by["client-1"]
    assert (tmp_path / "run" / "summary.json").exists()


def test_a_reply_in_any_key_order_decodes_to_its_own_factors():
    from flwr.app import ArrayRecord

    s = _strategy("fedex")
    (u,) = _round(s, [3], [4])
    items = list(update_to_record(u).array_records["fedlora.update"].items())
    orders = {"key-major": sorted(items, key=lambda kv: kv[0].split("::")[1]),  # l0::A, l1::A, .., l0::B
              "layers reversed": sorted(items, key=lambda kv: kv[0]), "reversed": items[::-1]}
    for what, order in orders.items():
        rd = update_to_record(u)
        rd["fedlora.update"] = ArrayRecord(dict(order))
        reason, clean = s.validator.check(record_to_update(rd), s.version, None)
        assert reason is None, what
        for n, f in u.factors.items():
            for k, t in f.items():
                assert torch.equal(clean.factors[n][k], t), (what, n, k)
        if what == "key-major":  # layers still in the model's order: the one-buffer path
            assert clean.flat is not None


def test_a_client_that_trains_at_another_rank_is_rejected_even_with_the_norm_bound():
    s = _strategy("fedavg", norm_bound=NormBound("clip", multiple=3.0))
    ups = _round(s, [4, 4, 4], [5, 5, 5])
    m = Multi(9, 2, s.scale, "lora")  # c1 was sent a rank-4 payload, trains and sends rank 2
    p2 = create_strategy("fedavg", layers=layer_specs(), r_max=4, scale=2.0, seed=1).payload("c1", 2, 0)
    apply_payload(m, p2)
    ups[1] = make_update(m, p2, 5)
    rep = s.aggregate(ups)
    assert rep.accepted == ["c0", "c2"] and "payload was for rank 4" in rep.rejected["c1"]


def test_the_norm_bound_survives_a_round_of_unchanged_updates():
    s = _strategy("fedavg", norm_bound=NormBound("reject", multiple=3.0))
    for i in range(3):
        s.payload(f"c{i}", 2, 0)
    ups = []
    for i in range(3):  # two clients send back exactly what they were sent: median size 0
        p = s.payload(f"c{i}", 2, 0)
        m = Multi(i, 2, s.scale, "lora")
        apply_payload(m, p)
        if i == 2:
            train_randomly(m, torch.Generator().manual_seed(0))
        ups.append(make_update(m, p, 5))
    rep = s.aggregate(ups)
    assert rep.accepted == ["c0", "c1"] and "norm bound" in rep.rejected["c2"]


@pytest.mark.parametrize("name", ["fedex", "flora"])
def test_a_folded_base_that_would_overflow_rejects_the_round_and_changes_nothing(name):
    s = _strategy(name)
    st = s.base.state()  # a base as after a long attack of in-range updates
    s.base.load({**st, "cum": {n: torch.full_like(t, torch.finfo(torch.float32).max)
                               for n, t in st["cum"].items()}})
    ups = _round(s, [2, 4], [5, 5])
    for f in ups[0].factors.values():  # within the per-round limit, but the base cannot take more
        f["B"].fill_(1e16)
        f["A"].fill_(1e16)
    before = state_tensors(s)
    rep = s.aggregate(ups)
    assert rep.accepted == [] and all("folded base" in r for r in rep.rejected.values()), rep.rejected
    after = state_tensors(s)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["fedex", "flora"])
def test_a_base_near_the_dtype_range_still_folds_exactly_when_it_fits(name):
    """Near the range the factor bound cannot rule overflow out: the real sums are formed and
    checked, and a round whose sums fit is folded as usual (the same new base)."""
    s = _strategy(name)
    st = s.base.state()
    big = 0.6 * torch.finfo(torch.float32).max  # one entry: the bound alone exceeds max / 2

    def spike(t):
        t = torch.zeros_like(t)
        t[0, 0] = big
        return t

    s.base.load({**st, "cum": {n: spike(t) for n, t in st["cum"].items()}})
    before = {n: t.clone() for n, t in s.base.cum.items()}
    rep = s.aggregate(_round(s, [2, 4], [5, 5]))
    assert len(rep.accepted) == 2, rep.rejected
    for n, d in s.base.deltas[s.version].items():
        delta = d.to_dense()
        assert delta.abs().max() > 0
        torch.testing.assert_close(s.base.cum[n], before[n] + delta)  # the other entries: exactly delta
        assert torch.isfinite(s.base.cum[n]).all()


def _with_heads(s, ups, seed=5):
    """Each update also carries a head (what a classification client uploads): the sent one plus noise."""
    g = torch.Generator().manual_seed(seed)
    for u in ups:
        u.head = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                  for k, v in s.global_head().items()}
    return ups


@pytest.mark.parametrize("name", [n for n in NAMES if _strategy(n).shares_head])
def test_a_huge_finite_head_is_rejected_alone(name):
    """The head is averaged like the factors: a finite head near the dtype's max (3e38) is rejected
    alone, naming it, and the global head is the honest clients' average."""
    s = _strategy(name)
    s.init_head({"classifier.weight": torch.zeros(3, 8), "classifier.bias": torch.zeros(3)})
    clean = copy.deepcopy(s)
    ups = _with_heads(s, _round(s, [2, 4, 3], [5, 6, 7]))
    _round(clean, [2, 4, 3], [5, 6, 7])
    ups[1].head["classifier.weight"].fill_(3e38)
    rep = s.aggregate(ups)
    ref = clean.aggregate([ups[0], ups[2]])
    assert rep.accepted == ["c0", "c2"] and "head 'classifier.weight'" in rep.rejected["c1"]
    assert rep.weights == ref.weights
    assert all(torch.equal(s.global_head()[k], clean.global_head()[k]) for k in s.global_head())


@pytest.mark.parametrize("mode", ["reject", "clip"])
def test_the_norm_bound_covers_the_head(mode):
    s = _strategy("fedavg", norm_bound=NormBound(mode, multiple=3.0))
    s.init_head({"classifier.weight": torch.ones(3, 8)})
    sent = s.global_head()["classifier.weight"]
    ups = _with_heads(s, _round(s, [2, 2, 2, 2], [5, 5, 5, 5]))
    h = ups[3].head["classifier.weight"]
    h.copy_(sent + 1e4 * (h - sent))  # factors like the others': the head alone makes it an outlier
    rep = s.aggregate(ups)
    if mode == "reject":
        assert rep.accepted == ["c0", "c1", "c2"] and "norm bound" in rep.rejected["c3"]
    else:
        assert rep.accepted == ["c0", "c1", "c2", "c3"] and rep.weights["c3"] == pytest.approx(0.25)
        got = s.global_head()["classifier.weight"] * 4 - sum(u.head["classifier.weight"] for u in ups[:3])
        assert float((got - sent).norm()) < float((h - sent).norm()) / 100  # its change was clipped


def _tampered_run(tmp_path, tamper, **values) -> list[dict]:
    from fedlora.config import load_config
    from fedlora.loopback import load_apps, run_loopback

    client_app, server_app = load_apps()
    cfg = load_config(None, values={"rounds": 2, "clients.num": 3, "train.local_steps": 2,
                                    "run_dir": str(tmp_path / "run"), **values})
    run_loopback(cfg, apps=(_tampering(client_app, tamper), server_app))
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_a_replys_metrics_and_privacy_record_cannot_bloat_or_break_the_run_files(tmp_path):
    """Lists, too many keys, an accountant history in a run without DP: the run keeps at most 64
    scalar numbers per reply and no history, and the report reads the files."""
    from flwr.app import ConfigRecord

    from fedlora.flower_io import PRIVACY
    from fedlora.report import write_report

    n = 200_000

    def tamper(rd):
        m = rd.metric_records["metrics"]
        m["epsilon"], m["junk"] = [1.0, 2.0], [0.5] * n
        for i in range(100):
            m[f"extra-{i}"] = float(i)
        rd[PRIVACY] = ConfigRecord({"noise_multipliers": [0.0] * n, "sample_rates": [1.0] * n,
                                    "steps": [1] * n})

    rows = _tampered_run(tmp_path, tamper)
    c1 = [c for r in rows for c in r["clients"] if c["id"] == "client-1"]
    assert len(c1) == 2 and all(c["accepted"] for c in c1)  # the update itself is fine
    assert all("epsilon" not in c["metrics"] and "junk" not in c["metrics"] and len(c["metrics"]) <= 64
               and "privacy_state" not in c for c in c1)
    assert all(isinstance(v, int | float) or v is None for c in c1 for v in c["metrics"].values())
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_size < 100_000
    write_report([tmp_path / "run"], tmp_path / "report")
    assert (tmp_path / "report" / "report.md").exists()


def test_an_accountant_history_longer_than_the_rounds_is_refused(tmp_path):
    from flwr.app import ConfigRecord

    from fedlora.flower_io import PRIVACY

    def tamper(rd):
        rd[PRIVACY] = ConfigRecord({"noise_multipliers": [1.0] * 50, "sample_rates": [0.1] * 50,
                                    "steps": [1] * 50})

    rows = _tampered_run(tmp_path, tamper, rounds=1,
                         **{"privacy.enabled": True, "privacy.noise_multiplier": 1.0})
    by = {c["id"]: c for c in rows[0]["clients"]}
    assert [c for c, r in by.items() if r["accepted"]] == ["client-0", "client-2"]
    assert "50 history entries" in by["client-1"]["error"]


def test_a_clients_own_accuracy_counts_only_within_0_and_1(tmp_path):
    """FedSA's headline is its clients' own evaluations: an impossible one is left out."""
    rows = _tampered_run(tmp_path, lambda rd: rd.metric_records["metrics"].__setitem__("eval-accuracy", 1e6),
                         rounds=1, **{"strategy.name": "fedsa"})
    (row,) = rows
    honest = [c for c in row["clients"] if c["id"] != "client-1"]
    want = (sum(c["metrics"]["eval-accuracy"] * c["metrics"]["eval-examples"] for c in honest)
            / sum(c["metrics"]["eval-examples"] for c in honest))
    assert row["accuracy"] == pytest.approx(want) and 0 <= row["accuracy"] <= 1


def test_an_error_replys_text_is_kept_bounded(tmp_path):
    """An error reply's reason (a client's word) is cut in metrics.jsonl and on the terminal."""
    from flwr.app import Error, Message

    from fedlora.config import load_config
    from fedlora.loopback import load_apps, run_loopback

    client_app, server_app = load_apps()

    def app(msg, ctx):
        if msg.metadata.message_type == "train" and int(ctx.node_config["partition-id"]) == 1:
            return Message(Error(0, "x" * 100_000), reply_to=msg)
        return client_app(msg, ctx)

    cfg = load_config(None, values={"rounds": 2, "clients.num": 3, "train.local_steps": 2,
                                    "run_dir": str(tmp_path / "run")})
    run_loopback(cfg, apps=(app, server_app))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    errors = [f["error"] for r in rows for f in r["failures"]]
    assert len(errors) == 2 and all(len(e) < 600 and e.endswith("(99500 more characters)") for e in errors)
    assert all(len(c) == 2 for r in rows for c in [[x for x in r["clients"] if x["accepted"]]])
