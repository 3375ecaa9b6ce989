"""Fuzzing the wire path: hypothesis-made malformed replies through flower_io decoding and the
ServerApp's aggregation. Never an exception out of the round; a rejected reply changes nothing
(the state equals that of the same round without it)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Message, MessageType, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora import flower_io
from fedlora.config import load_config
from fedlora.ledger import Pending, RoundLedger
from fedlora.loopback import ensure_task_identity
from fedlora.runlog import summarize
from fedlora.strategies import ClientUpdate

NODES = {101: ("client-0", 2), 102: ("client-1", 4), 103: ("client-2", 4)}  # node: (client, rank)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from server.app import FedLoraStrategy

    ensure_task_identity()
    run = tmp_path_factory.mktemp("fuzz")
    cfg = load_config(None, values={"clients.num": 3, "clients.ranks": [2, 4], "run_dir": str(run)})
    return FedLoraStrategy(cfg, run)


def _honest(fl, cid: str, rank: int, seed: int) -> RecordDict:
    p = fl.payload(cid, rank, fl.version)
    g = torch.Generator().manual_seed(seed)
    factors = {n: {k: t + 0.01 * torch.randn(t.shape, generator=g) for k, t in f.items() if k in fl.uploads}
               for n, f in p.factors.items()}
    head = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in fl.global_head().items()}
    return flower_io.update_to_record(ClientUpdate(cid, rank, 10 + seed, fl.version, factors, head),
                                      {"loss": 0.5})


def _bad_array(kind: str, a: np.ndarray) -> np.ndarray:
    return {"int": a.astype(np.int32), "f16": a.astype(np.float16), "f64": a.astype(np.float64),
            "shape": a.reshape(-1)[: max(1, a.size - 1)], "nan": np.full_like(a, np.nan),
            "inf": np.full_like(a, -np.inf), "huge": np.full_like(a, 3e38), "empty": a[:0],
            "scalar": np.float32(1.0)}[kind]


MUTATIONS = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(["fedlora.update", "fedlora.update.meta", "metrics"])),
    st.tuples(st.just("meta"), st.sampled_from(["client_id", "rank", "base_version"]),
              st.one_of(st.integers(-3, 10**12), st.floats(allow_nan=True), st.text(max_size=5))),
    st.tuples(st.just("metric"), st.sampled_from(["num-examples", "loss", "epsilon", "eval-accuracy"]),
              st.one_of(st.integers(-5, 10**15), st.floats(allow_nan=True, allow_infinity=True),
                        st.lists(st.integers(0, 9), max_size=3))),
    st.tuples(st.just("array"), st.integers(0, 10**6),
              st.sampled_from(["int", "f16", "f64", "shape", "nan", "inf", "huge", "empty", "scalar"])),
    st.tuples(st.just("key"), st.integers(0, 10**6), st.sampled_from(["x", "a::b::c", "head::", "::A"])),
    st.tuples(st.just("head"), st.sampled_from(["bogus", "drop", "shape", "nan"])),
    st.tuples(st.just("privacy"), st.sampled_from(["bytes", "lengths", "negative", "text"])),
)


def _mutate(rd: RecordDict, m: tuple) -> None:
    kind = m[0]
    if kind == "head":
        rec = rd.array_records["fedlora.update"]
        key = next(k for k in rec if k.startswith("head::"))
        if m[1] == "bogus":
            rec["head::bogus"] = Array(np.zeros(3, dtype=np.float32))
        elif m[1] == "drop":
            for k in [k for k in rec if k.startswith("head::")]:
                rec.pop(k)
        else:
            a = rec[key].numpy()
            rec[key] = Array(a.reshape(-1)[:-1].copy() if m[1] == "shape" else np.full_like(a, np.nan))
        return
    if kind == "privacy":
        rd[flower_io.PRIVACY] = ConfigRecord({
            "bytes": {"noise_multipliers": b"\x00\x01"}, "lengths": {"noise_multipliers": [1.0], "steps": []},
            "negative": {"noise_multipliers": [1.0], "sample_rates": [-0.5], "steps": [3]},
            "text": {"steps": "many"}}[m[1]])
        return
    if kind == "drop":
        for recs in (rd.array_records, rd.config_records, rd.metric_records):
            recs.pop(m[1], None)
    elif kind == "meta":
        v = m[2]
        rd.config_records["fedlora.update.meta"][m[1]] = v
    elif kind == "metric":
        v = m[2]
        if isinstance(v, list) and m[1] != "num-examples":
            v = [float(x) for x in v]
        rd.metric_records["metrics"][m[1]] = v
    else:
        rec = rd.array_records["fedlora.update"]
        keys = list(rec.keys())
        key = keys[m[1] % len(keys)]
        if kind == "array":
            rec[key] = Array(np.asarray(_bad_array(m[2], rec[key].numpy())))
        else:
            rec[m[2]] = rec.pop(key)


def _reply(rd: RecordDict, node: int) -> Message:
    return Message(rd, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def _states_equal(a, b) -> bool:
    def flat(x, out, path=""):
        if isinstance(x, torch.Tensor):
            out[path] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                flat(v, out, f"{path}/{k}")
        return out
    sa, sb = flat(a.state_dict(), {}), flat(b.state_dict(), {})
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(mutation=MUTATIONS, victim=st.sampled_from(sorted(NODES)), seed=st.integers(0, 1000))
def test_malformed_replies_never_escape_and_never_change_the_state(server, mutation, victim, seed):
    fl = server.fl
    for nid, (cid, rank) in NODES.items():
        if nid not in server.roster.nodes:
            server.roster.add(nid, cid, rank, "cpu", 10**6)
    server.ledger = RoundLedger(fl.round + 1)
    records = {}
    for nid, (cid, rank) in NODES.items():
        records[nid] = _honest(fl, cid, rank, seed + nid)
        server.ledger.expect(Pending(cid, nid, rank, fl.version, 0, 0))
    reference = copy.deepcopy(fl)  # the same payload bookkeeping, before the round
    honest = [flower_io.record_to_update(records[n]) for n in NODES if n != victim]
    _mutate(records[victim], mutation)
    server.aggregate_train(1, [_reply(records[n], n) for n in NODES])  # must not raise
    summarize(server.rows)  # the end of the run must survive what the replies held, too
    row = server.rows[-1]
    victim_row = next(c for c in row["clients"] if c["node"] == victim)
    others = [c for c in row["clients"] if c["node"] != victim]
    assert all(c["accepted"] for c in others), [(c.get("error"), c.get("rejected")) for c in others]
    if not victim_row["accepted"]:
        assert victim_row.get("error") or victim_row.get("rejected")
        reference.aggregate(honest)
        assert _states_equal(fl, reference), mutation
    if fl.has_global_model:
        assert all(math.isfinite(float(fl.global_delta(n).abs().max())) for n in fl.layers)
