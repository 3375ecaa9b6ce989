"""The real ServerApp strategy loop + the real ClientApp over fedlora.loopback.LoopbackGrid (no Ray).

Every strategy with mixed ranks: completes, metrics.jsonl is valid, loss falls; fedex/flora/fedsb
(and fedavg) end with the same global delta as ``fedlora.testing.run_harness`` (the in-process
harness: same seed, same per-client data draws, same local training) — the same math through Flower.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from fedlora.config import load_config
from fedlora.loopback import run_loopback
from fedlora.testing import run_harness as harness

RANKS = [2, 4, 8, 2]


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.INFO)
    yield
    logging.disable(logging.NOTSET)


def _cfg(tmp_path, name, rounds=2, extra=()):
    return load_config(None, [f"run_dir={json.dumps(str(tmp_path / name))}", f"rounds={rounds}",
                              f"strategy.name={json.dumps(name)}", f"clients.num={len(RANKS)}",
                              f"clients.ranks={RANKS}", *extra])


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["fedavg", "fedex", "flora", "fedsb", "fedsa"] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ("ffa", "rolora", "fedsvd", "flexlora", "hetlora")])
def test_strategy_through_flower_apps(tmp_path, name):
    cfg = _cfg(tmp_path, name)
    summary = run_loopback(cfg)
    run_dir = tmp_path / name
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2] and summary["rounds"] == 2 and summary["failures"] == 0
    for r in rows:
        assert r["strategy"] == name and not r["failures"]
        assert [c["rank"] for c in r["clients"]] == RANKS
        assert all(c["accepted"] and c["bytes_up"] > 0 and c["bytes_down"] > 0 for c in r["clients"])
        assert all(c["examples"] == 256 and c["train_seconds"] > 0 and c["peak_memory"] > 0
                   for c in r["clients"])
        assert r["bytes_up"] >= r["tensor_bytes_up"] > 0
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert (run_dir / "checkpoints").is_dir() and json.loads((run_dir / "summary.json").read_text())
    ref = harness(name, RANKS, rounds=2, local_steps=10, seed=0)
    if name == "fedsa":
        assert "personal_accuracy_mean" in rows[-1] and rows[-1]["personal_accuracy_weighted"] > 0.6
        return
    assert rows[-1]["accuracy"] > 0.7
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    got = load_file(str(run_dir / "global_delta.safetensors"))
    assert set(got) == set(ref.strategy.layers)
    for layer, d in got.items():
        torch.testing.assert_close(d, ref.strategy.global_delta(layer).float(), rtol=1e-4, atol=2e-6,
                                   msg=layer)
    if ref.strategy.exact:
        assert all(r["aggregation_error"] < 1e-4 for r in rows)


@pytest.mark.parametrize("dp", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_hetlora_clients_prune_their_rank_through_the_apps(tmp_path, dp):
    """HetLoRA's self-pruning crosses Flower's records: the payload's generic fields reach the
    ClientApp (also on the DP path), the reply comes back at the pruned rank and is accepted, and
    the next payload is sent at that rank."""
    extra = ["strategy.hetlora_lambda=20.0", "strategy.hetlora_gamma=0.5", "train.local_steps=5",
             "clients.ranks=[2, 4, 8]", "clients.num=3"]
    if dp:
        extra += ["privacy.enabled=true", "privacy.noise_multiplier=0.8"]
    run_loopback(_cfg(tmp_path, "hetlora", rounds=3, extra=extra))
    r1, r2, r3 = _rows(tmp_path / "hetlora")
    assert all(c["accepted"] for r in (r1, r2, r3) for c in r["clients"])
    assert [c["rank"] for c in r1["clients"]] == [c["rank"] for c in r2["clients"]] == [2, 4, 8]
    assert [c["metrics"]["upload-rank"] for c in r1["clients"]] == [2, 4, 8]  # round 1: the tails grew
    pruned = [c["metrics"]["upload-rank"] for c in r2["clients"]]
    assert pruned[:2] == [1, 2] and pruned[2] in (4, 8)
    assert [c["rank"] for c in r3["clients"]] == pruned  # sent at the pruned rank from then on
    assert r3["tensor_bytes_up"] < r1["tensor_bytes_up"]


def test_a_failing_client_does_not_stop_the_round(tmp_path):
    cfg = _cfg(tmp_path, "fedex")
    run_loopback(cfg, node_extra={1: {"fail-at-round": 1}})
    rows = _rows(tmp_path / "fedex")
    r1, r2 = rows
    assert len(r1["failures"]) == 1 and r1["failures"][0]["client"] == "client-1"
    assert "fault injection" in r1["failures"][0]["error"]
    bad = next(c for c in r1["clients"] if c["id"] == "client-1")
    assert not bad["accepted"] and "fault injection" in bad["error"]
    assert sum(c["accepted"] for c in r1["clients"]) == 3 and r1["aggregation_error"] < 1e-4
    # round 2: the failed client is re-synced from W0 and takes part again
    assert not r2["failures"] and all(c["accepted"] for c in r2["clients"])
    assert r2["aggregation_error"] < 1e-4


def test_a_node_with_another_fedlora_version_is_refused(tmp_path):
    """A node imports its own installed fedlora (the FAB carries only the apps): one whose release
    or code differs from the server's is refused at its capability query, both named, and never
    trains; the round goes on with the others."""
    from flwr.app import MessageType

    import fedlora
    from fedlora.loopback import load_apps
    from fedlora.version import library_version

    client_app, server_app = load_apps()

    def with_an_old_node(msg, context):
        reply = client_app(msg, context)
        if context.node_config["partition-id"] == 1 and msg.metadata.message_type == MessageType.QUERY:
            reply.content.config_records["caps.config"]["fedlora-version"] = "0.1.0+000000000000"
        return reply

    cfg = _cfg(tmp_path, "fedex")
    run_loopback(cfg, apps=(with_an_old_node, server_app))
    rows = _rows(tmp_path / "fedex")
    errors = [f["error"] for r in rows for f in r["failures"]]
    ours = library_version()
    assert ours.startswith(fedlora.__version__ + "+")
    assert errors and all(f"fedlora 0.1.0+000000000000, this server {ours}" in e for e in errors)
    for r in rows:
        assert sorted(c["id"] for c in r["clients"]) == ["client-0", "client-2", "client-3"]
        assert all(c["accepted"] for c in r["clients"]) and r["aggregation_error"] < 1e-4


def test_a_node_whose_torch_draws_other_random_numbers_is_refused(tmp_path):
    """Factors sent as seeds (FFA-LoRA's A) are exact only if the node's torch draws the server's
    numbers: a node with another random-number fingerprint is refused, both torch versions named."""
    from flwr.app import MessageType

    from fedlora.loopback import load_apps

    client_app, server_app = load_apps()

    def with_another_torch(msg, context):
        reply = client_app(msg, context)
        if context.node_config["partition-id"] == 2 and msg.metadata.message_type == MessageType.QUERY:
            caps = reply.content.config_records["caps.config"]
            caps["rng"], caps["torch-version"] = "0123456789ab", "9.9.9"
        return reply

    cfg = _cfg(tmp_path, "ffa")
    run_loopback(cfg, apps=(with_another_torch, server_app))
    rows = _rows(tmp_path / "ffa")
    errors = [f["error"] for r in rows for f in r["failures"]]
    assert errors and all(f"the node's torch (9.9.9) draws other random numbers for a seed than this "
                          f"server's ({torch.__version__})" in e for e in errors)
    for r in rows:
        assert sorted(c["id"] for c in r["clients"]) == ["client-0", "client-1", "client-3"]
        assert all(c["accepted"] for c in r["clients"]) and r["aggregation_error"] < 1e-4


def test_resume_equals_uninterrupted(tmp_path):
    full = _cfg(tmp_path, "fedex", rounds=3)
    run_loopback(full)
    cut = _cfg(tmp_path, "fedex", rounds=3, extra=[f"run_dir={json.dumps(str(tmp_path / 'cut'))}"])
    out = run_loopback(cut, stop_after_round=2)  # the server dies before round 3
    assert out["stopped"] and len(_rows(tmp_path / "cut")) == 2
    assert not (tmp_path / "cut" / "global_delta.safetensors").exists()
    run_loopback(cut, resume=True)  # fresh clients (a new Flower run), server state from round 2
    rows = _rows(tmp_path / "cut")
    assert [r["round"] for r in rows] == [1, 2, 3]
    a = load_file(str(tmp_path / "fedex" / "global_delta.safetensors"))
    b = load_file(str(tmp_path / "cut" / "global_delta.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert rows[-1]["accuracy"] == pytest.approx(_rows(tmp_path / "fedex")[-1]["accuracy"], abs=0.01)


def test_dp_clients_compose_epsilon_across_rounds(tmp_path):
    cfg = _cfg(tmp_path, "fedex", extra=["privacy.enabled=true", "privacy.noise_multiplier=0.8",
                                         "train.local_steps=3"])
    run_loopback(cfg)
    r1, r2 = _rows(tmp_path / "fedex")
    assert not r1["failures"] and not r2["failures"]
    for c1, c2 in zip(r1["clients"], r2["clients"]):
        e1, e2 = c1["metrics"]["epsilon"], c2["metrics"]["epsilon"]
        assert 0 < e1 < e2  # the accountant history lives in the client's context.state
    summary = json.loads((tmp_path / "fedex" / "summary.json").read_text())
    assert summary["max_epsilon"] == max(c["metrics"]["epsilon"] for c in r2["clients"])
    assert 0 < summary["delta"] < 1
    from fedlora.report import load_run

    assert load_run(tmp_path / "fedex").epsilon == summary["max_epsilon"]  # what compare reports


def test_resolved_config_names_an_absolute_run_dir(tmp_path, monkeypatch):
    """The ServerApp runs from Flower's app folder: the written config must not be cwd-relative."""
    from fedlora.sim import prepare_run_dir

    monkeypatch.chdir(tmp_path)
    path = prepare_run_dir(load_config(None, ["name=rel"]))
    cfg = load_config(path)
    assert cfg.run_dir == str(tmp_path / "runs" / "rel") and path.parent == tmp_path / "runs" / "rel"


def test_bytes_are_the_messages_flower_moves(tmp_path):
    """Every client row's bytes are the wire size of the exact message it got and the reply it sent;
    the capability queries are counted in the round that sent them."""
    from flwr.app import MessageType

    from fedlora.flower_io import wire_bytes

    grids: list = []
    run_loopback(_cfg(tmp_path, "fedex"), grid_out=grids)
    rows = _rows(tmp_path / "fedex")
    sent = grids[0].delivered
    queries = [(m, r) for m, r in sent if m.metadata.message_type == MessageType.QUERY]
    trains = [(m, r) for m, r in sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(queries) == len(RANKS) and len(trains) == 2 * len(RANKS)
    assert rows[0]["query_bytes_down"] == sum(wire_bytes(m) for m, _ in queries) > 0
    assert rows[0]["query_bytes_up"] == sum(wire_bytes(r) for _, r in queries) > 0
    assert rows[1]["query_bytes_down"] == rows[1]["query_bytes_up"] == 0
    for rnd, row in enumerate(rows, start=1):
        by_node = {m.metadata.dst_node_id: (m, r) for m, r in trains if m.metadata.group_id == str(rnd)}
        for c in row["clients"]:
            m, r = by_node[c["node"]]
            assert c["bytes_down"] == wire_bytes(m) > c["tensor_bytes_down"] > 0
            assert c["bytes_up"] == wire_bytes(r)
        assert row["bytes_down"] == sum(c["bytes_down"] for c in row["clients"]) + row["query_bytes_down"]
        assert row["bytes_up"] == sum(c["bytes_up"] for c in row["clients"]) + row["query_bytes_up"]
    # round 2 of fedex also carries the residual of round 1: more down than round 1
    train_down = [r["bytes_down"] - r["query_bytes_down"] for r in rows]
    assert train_down[1] > train_down[0]


def test_dp_accountant_survives_a_server_restart(tmp_path):
    """A resumed run has fresh client contexts: the server's copy of each client's accountant
    history (public σ, q, steps) keeps ε composing from where it was, as in the uninterrupted run."""
    dp = ["privacy.enabled=true", "privacy.noise_multiplier=0.8", "train.local_steps=3"]
    run_loopback(_cfg(tmp_path, "fedex", rounds=3, extra=dp))
    cut = _cfg(tmp_path, "fedex", rounds=3, extra=[*dp, f"run_dir={json.dumps(str(tmp_path / 'cut'))}"])
    run_loopback(cut, stop_after_round=2)
    run_loopback(cut, resume=True)
    full, resumed = _rows(tmp_path / "fedex"), _rows(tmp_path / "cut")
    eps = lambda rows, r: {c["id"]: c["metrics"]["epsilon"] for c in rows[r]["clients"]}  # noqa: E731
    assert all(eps(resumed, 2)[k] > eps(resumed, 1)[k] for k in eps(resumed, 2))
    assert eps(resumed, 2) == pytest.approx(eps(full, 2), rel=1e-9)
    steps = [c["privacy_state"]["steps"] for c in resumed[2]["clients"]]
    assert all(sum(s) == 9 for s in steps)  # 3 rounds x 3 steps in one history per client


def test_fedsb_init_step_is_the_learning_rate(tmp_path):
    """LoRA-SB's init approximates one optimizer step −η·sign(G): η is train.lr unless
    strategy.fedsb_eta is set (η = 1 would move every weight by ~1 and lose the pretrained model)."""
    from server.app import FedLoraStrategy

    def init_delta(*extra):
        cfg = _cfg(tmp_path, "fedsb", extra=["train.lr=0.002", *extra])
        s = FedLoraStrategy(cfg, tmp_path / "fedsb")
        return {n: s.fl.global_delta(n) for n in s.fl.layers}

    a, b = init_delta(), init_delta("strategy.fedsb_eta=0.5")
    for n in a:
        assert 0 < a[n].abs().max() < 10 * 0.002
        torch.testing.assert_close(b[n], a[n] * (0.5 / 0.002), rtol=1e-4, atol=1e-7)


def test_polling_grid_ends_a_train_exchange_at_min_replies():
    from flwr.app import Message, MessageType, RecordDict

    from fedlora.loopback import ensure_task_identity
    from server.app import PollingGrid

    ensure_task_identity()

    class SlowGrid:  # one reply per poll, like nodes finishing one after the other
        def __init__(self):
            self.pending, self.polls = [], 0

        def push_messages(self, msgs):
            self.pending = [(f"m{i}", m) for i, m in enumerate(msgs)]
            return [mid for mid, _ in self.pending]

        def pull_messages(self, ids):
            self.polls += 1
            if not self.pending:
                return []
            mid, m = self.pending.pop(0)
            reply = Message(RecordDict(), reply_to=m)
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            return [reply]

    def msgs(kind):
        return [Message(RecordDict(), dst_node_id=n, message_type=kind) for n in (1, 2, 3)]

    g = SlowGrid()
    assert len(PollingGrid(g, 0.001, min_replies=2).send_and_receive(msgs(MessageType.TRAIN), timeout=5)) == 2
    assert g.polls == 2
    g = SlowGrid()  # capability queries always wait for everybody
    assert len(PollingGrid(g, 0.001, min_replies=2).send_and_receive(msgs(MessageType.QUERY), timeout=5)) == 3
    g = SlowGrid()
    assert len(PollingGrid(g, 0.001).send_and_receive(msgs(MessageType.TRAIN), timeout=5)) == 3


def test_polling_grid_polls_soon_then_backs_off(monkeypatch):
    """10 ms after sending and after each reply, doubling up to clients.poll_interval between."""
    from flwr.app import Message, MessageType, RecordDict

    import server.app as server_app
    from fedlora.loopback import ensure_task_identity

    ensure_task_identity()
    waits = []
    monkeypatch.setattr(server_app.time, "sleep", waits.append)

    class LateGrid:  # the first reply after 6 empty polls, the second right after it
        def __init__(self):
            self.polls, self.pending = 0, []

        def push_messages(self, msgs):
            self.pending = [(f"m{i}", m) for i, m in enumerate(msgs)]
            return [mid for mid, _ in self.pending]

        def pull_messages(self, ids):
            self.polls += 1
            if self.polls < 7 or not self.pending:
                return []
            mid, m = self.pending.pop(0)
            reply = Message(RecordDict(), reply_to=m)
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            return [reply]

    msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2)]
    got = server_app.PollingGrid(LateGrid(), 0.2).send_and_receive(msgs, timeout=None)
    assert len(got) == 2
    assert waits == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.16, 0.2, 0.01])


def test_resume_skips_damaged_checkpoints_or_refuses(tmp_path, caplog):
    cfg = _cfg(tmp_path, "fedex", rounds=3, extra=["train.local_steps=2"])
    run_loopback(cfg)
    ck = tmp_path / "fedex" / "checkpoints"
    data = (ck / "round-0003.ckpt").read_bytes()
    (ck / "round-0003.ckpt").write_bytes(data[: len(data) // 2])  # truncated
    flipped = bytearray((ck / "round-0002.ckpt").read_bytes())
    flipped[len(flipped) // 2] ^= 0x40  # one byte inside the tensor data
    (ck / "round-0002.ckpt").write_bytes(bytes(flipped))
    with caplog.at_level("WARNING"):
        run_loopback(_cfg(tmp_path, "fedex", rounds=3, extra=["train.local_steps=2"]), resume=True)
    assert "round-0003.ckpt" in caplog.text and "round-0002.ckpt" in caplog.text
    assert [r["round"] for r in _rows(tmp_path / "fedex")] == [1, 2, 3]  # rounds 2 and 3 again
    for p in ck.glob("*.ckpt"):
        p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ValueError, match="no checkpoint verifies"):
        run_loopback(_cfg(tmp_path, "fedex", rounds=3, extra=["train.local_steps=2"]), resume=True)


def test_same_seed_same_bits_and_a_resume_too(tmp_path):
    a = _cfg(tmp_path, "fedex", rounds=3, extra=["train.local_steps=3", 'run_dir="%s"' % (tmp_path / "a")])
    b = _cfg(tmp_path, "fedex", rounds=3, extra=["train.local_steps=3", 'run_dir="%s"' % (tmp_path / "b")])
    run_loopback(a)
    run_loopback(b)
    da = load_file(str(tmp_path / "a" / "global_delta.safetensors"))
    db = load_file(str(tmp_path / "b" / "global_delta.safetensors"))
    assert all(torch.equal(da[k], db[k]) for k in da)
    c = _cfg(tmp_path, "fedex", rounds=3, extra=["train.local_steps=3", 'run_dir="%s"' % (tmp_path / "c")])
    run_loopback(c, stop_after_round=2)
    run_loopback(c, resume=True)
    dc = load_file(str(tmp_path / "c" / "global_delta.safetensors"))
    assert all(torch.equal(da[k], dc[k]) for k in da)  # killed after round 2 and resumed: same bits
