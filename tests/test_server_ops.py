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


def test_refused_nodes_reach_the_server_log_once(tmp_path, caplog):
    cfg = _cfg(tmp_path, "rounds=2")
    with caplog.at_level(logging.WARNING, logger="fedlora.server"):
        run_loopback(cfg, node_extra={1: {"rank": 16}})  # r_max is 4
    said = [r.getMessage() for r in caplog.records if "failed at query" in r.getMessage()]
    assert len(said) == 1 and "rank 16 (r_max 4)" in said[0], said  # re-asked in round 2, said once
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["clients"]) == 2 for r in rows)  # the others go on


def test_two_nodes_with_one_partition_id_are_named(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedlora.server"):
        run_loopback(cfg, node_extra={2: {"partition-id": 1}})
    assert any("has partition-id 1, as connected node" in r.getMessage() for r in caplog.records)


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
