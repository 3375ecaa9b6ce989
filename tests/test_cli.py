"""The command line as a user meets it: help texts, DP plans, resume notes, runs that did nothing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedlora.cli import app

FAST = ["--set", "train.local_steps=2", "--set", "clients.num=3", "--engine", "inprocess"]


class _Out:
    def __init__(self, res):
        self.exit_code, self.output = res.exit_code, " ".join(res.output.split())  # rich wraps lines


def _run(*args):
    return _Out(CliRunner().invoke(app, list(args)))


def test_help_describes_every_argument():
    for cmd in (["simulate"], ["compare"], ["dp", "plan"]):
        out = _run(*cmd, "--help").output
        assert "CONFIG: a run TOML" in out, (cmd, out)
    assert "--rounds" in _run("compare", "--help").output


def test_dp_plan_prints_each_client_and_refuses_an_unreachable_budget():
    res = _run("dp", "plan", "--set", "privacy.enabled=true", "--set", "privacy.target_epsilon=3.0",
               "--set", "clients.num=2")
    assert res.exit_code == 0, res.output
    assert "client-0" in res.output and "client-1" in res.output and "2.99" in res.output
    res = _run("dp", "plan", "--set", "privacy.enabled=true", "--set", "privacy.target_epsilon=1e-6")
    assert res.exit_code == 2 and "smallest" in res.output
    assert _run("dp", "plan").exit_code == 2  # privacy off: nothing to plan


def test_errors_reach_the_terminal_verbatim_brackets_included():
    for cmd in (["simulate"], ["compare"]):  # rich would read "[data]" as a style tag and drop it
        res = _run(*cmd, "--set", "data.partiton_by=1")
        assert res.exit_code == 2 and "known keys of [data]:" in res.output, res.output


def test_a_run_in_which_no_client_ever_trained_exits_non_zero(tmp_path):
    run = tmp_path / "idle"
    res = _run("simulate", "--rounds", "2", "--set", f'run_dir="{run}"', "--set",
               'strategy.norm_bound_mode="reject"', "--set", "strategy.norm_bound_absolute=1e-12", *FAST)
    assert res.exit_code == 1, res.output
    assert "no client trained in any round" in res.output
    assert "norm bound" in " ".join(res.output.split())  # the clients' own rejection reason is shown
    assert json.loads((run / "summary.json").read_text())["rounds_without_training"] == [1, 2]


def test_resume_says_which_checkpoint_it_starts_from(tmp_path):
    run = tmp_path / "r"
    assert _run("simulate", "--rounds", "2", "--set", f'run_dir="{run}"', *FAST).exit_code == 0
    ck = run / "checkpoints" / "round-0002.ckpt"
    ck.write_bytes(ck.read_bytes()[:-10])
    res = _run("simulate", "--resume", str(run), "--rounds", "2", *FAST[-2:])
    assert res.exit_code == 0, res.output
    assert "skipping round-0002.ckpt" in res.output and "resuming from round-0001.ckpt" in res.output
    for p in (run / "checkpoints").glob("*.ckpt"):
        p.write_bytes(b"junk")
    res = _run("simulate", "--resume", str(run), *FAST[-2:])
    assert res.exit_code == 1 and "no checkpoint verifies" in res.output


BOOM = '''
from fedlora.strategies import register_strategy
from fedlora.strategies.fedavg import FedAvg


@register_strategy
class Boom(FedAvg):
    name = "boom"

    def _aggregate(self, updates, p, sums):
        raise RuntimeError("boom from the plugin's aggregate")
'''


@pytest.fixture(scope="module")
def boom_plugin(tmp_path_factory):
    # one file for the module: a strategy name registered from two files is (rightly) refused
    plugin = tmp_path_factory.mktemp("plugin") / "boom.py"
    plugin.write_text(BOOM)
    return plugin


def _boom(tmp_path, plugin, engine):
    return _run("simulate", "--strategy", "boom", "--rounds", "1", "--set", f'strategy.plugins=["{plugin}"]',
                "--set", f'run_dir="{tmp_path / "run"}"', "--set", "clients.num=2",
                "--set", "train.local_steps=1", "--engine", engine)


def test_an_error_inside_the_server_reaches_the_terminal_in_process(tmp_path, boom_plugin):
    res = _boom(tmp_path, boom_plugin, "inprocess")
    assert res.exit_code == 1 and "boom from the plugin's aggregate" in res.output, res.output


@pytest.mark.slow
def test_an_error_inside_the_server_reaches_the_terminal_from_flowers_engine(tmp_path, boom_plugin):
    res = _boom(tmp_path, boom_plugin, "flower")
    assert res.exit_code == 1 and "boom from the plugin's aggregate" in res.output, res.output


def test_resuming_with_another_strategy_is_refused_before_the_run_folder_changes(tmp_path):
    run = tmp_path / "r"
    assert _run("simulate", "--rounds", "1", "--set", f'run_dir="{run}"', *FAST).exit_code == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    res = _run("simulate", "--resume", str(run), "--strategy", "fedavg", "--rounds", "2", *FAST[-2:])
    assert res.exit_code == 2 and "that run's strategy is 'fedex', not 'fedavg'" in res.output, res.output
    assert "leave out --strategy" in res.output
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # summary.json kept


def test_a_fresh_run_says_what_it_replaces_and_never_shows_the_old_rounds(tmp_path):
    run = tmp_path / "r"
    assert _run("simulate", "--rounds", "2", "--set", f'run_dir="{run}"', *FAST).exit_code == 0
    res = _run("simulate", "--rounds", "1", "--set", f'run_dir="{run}"', *FAST)
    assert res.exit_code == 0 and "held a finished 2-round fedex run: replaced" in res.output, res.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    from fedlora import sim
    from fedlora.config import load_config

    # a run that fails before its first round leaves no older round to be shown as its own
    sim.prepare_run_dir(load_config(None, values={"run_dir": str(run)}))
    assert not (run / "metrics.jsonl").exists() and not (run / "summary.json").exists()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_a_data_file_without_the_configured_columns_is_a_config_error(tmp_path, suffix):
    import pandas as pd

    df = pd.DataFrame({"review": ["good", "bad"] * 4, "sentiment": ["pos", "neg"] * 4})
    path = tmp_path / f"reviews{suffix}"
    {".csv": lambda: df.to_csv(path, index=False),
     ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".json": lambda: df.to_json(path, orient="records"), ".parquet": lambda: df.to_parquet(path)}[suffix]()
    res = _run("simulate", "--set", f'data.name="{path}"', "--set", 'data.text_col="review"',
               "--set", f'run_dir="{tmp_path / "run"}"', *FAST)
    assert res.exit_code == 2, res.output
    assert "data.label_col: " in res.output and "has no column 'label'" in res.output
    assert "'review', 'sentiment'" in res.output and not (tmp_path / "run").exists()


def test_a_comparison_says_which_earlier_runs_it_replaces_and_which_it_leaves_out(tmp_path):
    root = tmp_path / "cmp"
    args = ["compare", "--rounds", "1", "--set", f'run_dir="{root}"', *FAST]
    assert _run(*args, "--strategies", "fedavg,fedex").exit_code == 0
    res = _run(*args, "--strategies", "fedavg")
    assert res.exit_code == 0, res.output
    assert f"replacing earlier runs in {root}: fedavg" in res.output
    assert f"{root} also holds runs this comparison does not make (fedex): they are not in its" in res.output
    assert "| fedex |" not in (root / "report.md").read_text()


def test_a_stop_inside_a_host_process_ends_the_command_not_the_host():
    import typer

    from fedlora.cli import _stoppable

    with pytest.raises(typer.Exit) as e, _stoppable(lambda: "continue with: x"):
        raise KeyboardInterrupt
    assert e.value.exit_code == 130
